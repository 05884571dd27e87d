"""Optional ``timm`` integration: registers every natkit model with ``timm``'s registry.

Called when ``natkit.models`` is imported and ``timm`` is importable; then
``timm.create_model("nat_tiny", num_classes=10)`` works (names timm already has are
left alone). timm's ``pretrained=True`` needs a local file, given as
``pretrained_cfg_overlay=dict(file=PATH)`` (natkit hosts no weights); timm's
``checkpoint_path=PATH`` works too.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

from ._registry import create_model, list_models

logger = logging.getLogger("natkit")


def _entrypoint(name: str):
    def entrypoint(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                   cache_dir=None, **kwargs):
        path = None
        if pretrained:
            path = (pretrained_cfg_overlay or {}).get("file")
            if path is None:
                raise ValueError(f"{name}: natkit hosts no weights; pass "
                                 f"pretrained_cfg_overlay=dict(file=PATH) or checkpoint_path")
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        feature_cls = kwargs.pop("feature_cls", None)
        if feature_cls not in (None, "getter"):  # natkit's backbone mode is timm's "getter"
            raise ValueError(f"{name}: feature_cls={feature_cls!r} is not supported; natkit "
                             f"backbones (features_only=True) return forward_intermediates' "
                             f"features, as timm's 'getter' does")
        model = create_model(name, pretrained=path, **kwargs)
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"natkit's {name} (see natkit.models.create_model)."
    return entrypoint


def register_with_timm(timm_models=None) -> list[str]:
    """Registers natkit's models with ``timm`` (``timm_models``: the ``timm.models``
    module, imported when None). Returns the names registered."""
    if timm_models is None:
        if importlib.util.find_spec("timm") is None:
            return []
        try:
            import timm.models as timm_models
        except Exception as err:  # a broken timm install must not break natkit
            logger.debug("natkit: timm not registered: %s", err)
            return []
    module = sys.modules[__name__]
    done = []
    for name in list_models():
        if timm_models.is_model(name):
            continue
        fn = _entrypoint(name)
        setattr(module, name, fn)   # timm looks the entrypoint's module up
        timm_models.register_model(fn)
        done.append(name)
    return done
