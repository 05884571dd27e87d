"""natkit: fast neighborhood attention (NA) for 1-D, 2-D and 3-D token grids."""

from .backends import available_backends, use_backend
from .functional import merge_attentions, na1d, na2d, na3d, neighborhood_attention
from .modules import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

__version__ = "0.1.0"

__all__ = [
    "na1d", "na2d", "na3d", "neighborhood_attention", "merge_attentions",
    "available_backends", "use_backend",
    "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D",
]
