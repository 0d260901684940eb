"""Named RevCol variants: ``create_model('revcol_tiny', num_classes=10)``."""

from __future__ import annotations

import difflib
from typing import Dict, List

from .config import RevColConfig
from .revcol import RevCol

_VARIANTS: Dict[str, RevColConfig] = {}


def register_variant(config: RevColConfig) -> RevColConfig:
    if config.name in _VARIANTS:
        raise ValueError(f"variant {config.name!r} is already registered")
    _VARIANTS[config.name] = config
    return config


def list_models() -> List[str]:
    return list(_VARIANTS)


def get_variant(name: str) -> RevColConfig:
    if name not in _VARIANTS:
        close = difflib.get_close_matches(name, list(_VARIANTS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown model {name!r}{hint}; available: {', '.join(list_models())}")
    return _VARIANTS[name]


def create_model(name: str, **overrides) -> RevCol:
    """Build a registered variant; keyword arguments override fields of its RevColConfig."""
    return RevCol(get_variant(name).replace(**overrides))


# The published variants (kernel size 3, expansion 4, drop path as in the authors' builders).
# RevCol-T/S keep level 3 in every column by default (measured: docs/benchmarks.md).
register_variant(RevColConfig((64, 128, 256, 512), (2, 2, 4, 2), 4, drop_path=0.1, keep_levels=(3,),
                              name="revcol_tiny"))
register_variant(RevColConfig((64, 128, 256, 512), (2, 2, 4, 2), 8, drop_path=0.3, keep_levels=(3,),
                              name="revcol_small"))
register_variant(RevColConfig((72, 144, 288, 576), (1, 1, 3, 2), 16, drop_path=0.4, name="revcol_base"))
register_variant(RevColConfig((128, 256, 512, 1024), (1, 2, 6, 2), 8, drop_path=0.5, name="revcol_large"))
register_variant(RevColConfig((224, 448, 896, 1792), (1, 2, 6, 2), 8, drop_path=0.5, name="revcol_xlarge"))
register_variant(
    RevColConfig((360, 720, 1440, 2880), (1, 2, 6, 2), 8, drop_path=0.5, level0_up2=True, name="revcol_huge")
)

# Not published: the main job's small RevCol (configs/default.yaml), sized for 32x32 images and
# CPU runs; the same structure and key names as RevCol-T.
register_variant(RevColConfig((32, 64, 96, 128), (1, 1, 2, 1), 4, drop_path=0.0, keep_levels=(3,), name="revcol_mini"))
