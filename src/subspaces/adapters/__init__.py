"""Adapters: fine-tune a few parameters in a subspace, fold them back. One file per method."""
from ._core import AdapterConfig, Delta
from .adalora import AdaLoRA
from .increlora import IncreLoRA
from .intrinsic import Intrinsic
from .flora import FLoRA
from .lora import LoRA
from .lora_sb import LoRASB
from .lora_xs import LoRAXS
from .maestro import Maestro
from .mos import MoS
from .nola import NOLA
from .randlora import RandLoRA
from .said import SAID
from .salt import SALT
from .sora import SoRA
from .svfit import SVFit
from ._schedule import param_groups, penalty, step

__all__ = ["AdaLoRA", "AdapterConfig", "Delta", "IncreLoRA", "Intrinsic", "FLoRA", "LoRA", "LoRASB", "LoRAXS", "Maestro", "MoS", "NOLA", "RandLoRA", "SAID", "SALT", "SVFit", "SoRA", "param_groups", "penalty", "step"]
