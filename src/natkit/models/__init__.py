"""NAT and DiNAT model families (timm style), compatible with the official checkpoints.

``create_model(name, pretrained=PATH, **overrides)``, ``list_models(pattern)``; models
expose ``forward_features``, ``forward_head``, ``forward_intermediates``,
``no_weight_decay``, ``set_grad_checkpointing`` and a backbone mode
(``features_only=True, out_indices=...``). When ``timm`` is importable the models are
registered with it too.
"""

from ._registry import create_model, list_models, register_model
from .convert import (CheckpointMismatchError, from_hf_state_dict, load_checkpoint,
                      to_hf_state_dict)
from .dinat import DiNAT, DiNAT_s   # importing the families populates the registry
from .isotropic import NATIsotropic
from .nat import NAT
from ._timm import register_with_timm

register_with_timm()

__all__ = ["create_model", "list_models", "register_model", "load_checkpoint",
           "CheckpointMismatchError", "from_hf_state_dict", "to_hf_state_dict",
           "NAT", "DiNAT", "DiNAT_s", "NATIsotropic"]
