"""One interface over the ways a model is trained: a single process, DDP, or a DeepSpeed
engine (ZeRO-1/2/3, offload). The training loop talks to this, never to the engines."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..models.official import to_official_state_dict
from .distributed import DistInfo
from .ds_config import zero_stage


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay for 1-D parameters (norms, biases, layer scales)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim  # ZeRO-3: the real shape
            (no_decay if ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, name: str, weight_decay: float) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8)


class Backend:
    name = "base"

    def __init__(self, model: torch.nn.Module, info: DistInfo) -> None:
        self.model = model  # the plain module (unwrapped)
        self.info = info
        self.last_grad_norm: Optional[float] = None

    def forward(self, x):
        raise NotImplementedError

    def backward_and_step(self, loss: torch.Tensor, lr: float) -> None:
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Write this rank's share of model + optimizer state into ``directory``."""
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        raise NotImplementedError

    def official_state_dict(self, checkpoint_dir: Optional[Path] = None) -> Optional[Dict[str, torch.Tensor]]:
        """Full fp32 weights under the released key names, on rank 0 (None elsewhere)."""
        return to_official_state_dict(self.model) if self.info.is_main else None


class LocalBackend(Backend):
    """One process, or DDP across processes; AdamW from torch."""

    def __init__(self, model, info, optimizer: str, weight_decay: float, clip_grad: Optional[float], device) -> None:
        super().__init__(model.to(device), info)
        self.name = "ddp" if info.world_size > 1 else "single"
        self.net = model
        if info.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.optimizer = make_optimizer(model, optimizer, weight_decay)
        self.clip = clip_grad

    def forward(self, x):
        return self.net(x)

    def backward_and_step(self, loss, lr):
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip or float("inf"))
        self.last_grad_norm = float(norm)
        self.optimizer.step()

    def save(self, directory):
        from ..engine.checkpoint import atomic_save

        if self.info.is_main:
            atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                        directory / "model_optim.pt")

    def load(self, directory):
        state = torch.load(directory / "model_optim.pt", map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class DeepSpeedBackend(Backend):
    def __init__(self, model, info, ds_config: Dict[str, Any], optimizer: str, weight_decay: float) -> None:
        import deepspeed

        super().__init__(model, info)
        stage = zero_stage(ds_config)
        self.name = f"zero{stage}"
        opt = make_optimizer(model, optimizer, weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        self.stage = stage

    def forward(self, x):
        return self.engine(x)

    def backward_and_step(self, loss, lr):
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        self.last_grad_norm = None if norm is None else float(norm)

    def save(self, directory):
        # every rank writes its shard; the caller commits the folder once all are done
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)

    def load(self, directory):
        path, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {directory}")

    def official_state_dict(self, checkpoint_dir=None):
        if self.stage < 3:
            return super().official_state_dict()
        if checkpoint_dir is None:
            raise ValueError("ZeRO-3 weights are consolidated from a saved checkpoint")
        if not self.info.is_main:
            return None
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from ..models.official import _to_official_key

        sd = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)
        return {_to_official_key(k, self.model.config.inter_supv): v for k, v in sd.items()}
