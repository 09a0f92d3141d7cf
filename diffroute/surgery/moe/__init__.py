"""Expert-choice mixture of experts for DiT FFNs: slice upcycling, timestep-dependent capacity, save and load."""

from diffroute.surgery.moe.capacity import Capacity, parse_capacity
from diffroute.surgery.moe.hooks import drive_nucleus_capacity, undrive_nucleus_capacity
from diffroute.surgery.moe.layer import ExpertChoiceFFN
from diffroute.surgery.moe.upcycle import moe_layers, remove_moe, upcycle_moe

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
