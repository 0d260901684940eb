"""RevCol models: plain nn.Modules that know nothing of parallelism."""

from .config import RevColConfig
from .official import load_official_checkpoint, to_official_state_dict
from .registry import create_model, get_variant, list_models, register_variant
from .revcol import RevCol, RevColOutput

__all__ = [
    "RevCol",
    "RevColConfig",
    "RevColOutput",
    "create_model",
    "get_variant",
    "list_models",
    "register_variant",
    "load_official_checkpoint",
    "to_official_state_dict",
]
