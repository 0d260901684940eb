"""Initial weights for fine-tuning: the authors' released .pth, our ``model_official.pth``, or
one of our checkpoint folders (any backend, ZeRO-3 included). Heads of another class count are
left at their (head_init_scale) initialisation."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from ..models.official import CheckpointError, LoadReport, load_official_checkpoint, rename_to_official


def folder_state_dict(folder: Path) -> Dict[str, torch.Tensor]:
    if not (folder / "complete.json").is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint folder (no complete.json); "
                              f"pass a step_* folder under <output_dir>/checkpoints or a .pth file")
    from .portable_checkpoint import portable_folder

    portable, local = portable_folder(folder), folder / "model_optim.pt"
    if portable is not None:  # fp32 weights by parameter name, whatever layout wrote them
        from ..portable import PortableReader

        reader = PortableReader(portable)
        sd = {k[len("param/"):]: reader.full(k) for k in reader.tensors if k.startswith("param/")}
        reader.close()
    elif local.is_file():
        sd = torch.load(local, map_location="cpu", weights_only=True)["model"]
    elif any(folder.glob("pipeline_stage*.pt")):
        raise CheckpointError(f"{folder} is a pipeline checkpoint without its layout-free form: add it with "
                              f"launchers/convert_checkpoint.py on the layout that wrote it")
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    inter_supv = any(k.startswith("decoders.") for k in sd)
    return rename_to_official(sd, inter_supv)


def load_pretrained(model: torch.nn.Module, path: str, use_ema: bool = False, only=None) -> LoadReport:
    """Load on every rank (call collectively under ZeRO-3: parameters are gathered, rank 0 loads,
    the result is re-partitioned). ``only``: the keys this rank holds (a pipeline stage's)."""
    src = Path(path)
    if not src.exists():
        raise CheckpointError(f"pretrained weights not found: {src}")
    source = folder_state_dict(src) if src.is_dir() else src
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            report = load_official_checkpoint(model, source, strict=False, use_ema=use_ema)
        return report
    return load_official_checkpoint(model, source, strict=False, use_ema=use_ema, only=only)
