"""Expert-choice mixture of experts for DiT FFNs: slice upcycling, timestep-dependent capacity, save and load."""

from .capacity import Capacity, parse_capacity
from .hooks import drive_nucleus_capacity, undrive_nucleus_capacity
from .layer import ExpertChoiceFFN
from .upcycle import moe_layers, remove_moe, upcycle_moe

__all__ = [
    "Capacity",
    "ExpertChoiceFFN",
    "drive_nucleus_capacity",
    "moe_layers",
    "parse_capacity",
    "remove_moe",
    "undrive_nucleus_capacity",
    "upcycle_moe",
]
