"""One interface over the ways a model is trained: a single process, DDP, or a DeepSpeed
engine (ZeRO-1/2/3, offload). The training loop talks to this, never to the engines."""

from __future__ import annotations

from pathlib import Path
import math
from contextlib import nullcontext
from typing import Any, Dict, Optional

import torch

from ..engine.optim import make_optimizer, set_lr
from ..models.official import to_official_state_dict
from .distributed import DistInfo
from .ds_config import zero_stage


class Backend:
    name = "base"

    def __init__(self, model: torch.nn.Module, info: DistInfo, precision: str = "fp32") -> None:
        self.model = model  # the plain module (unwrapped)
        self.info = info
        self.precision = precision
        self.last_grad_norm: Optional[float] = None

    def autocast(self):
        """bf16/fp16 autocast around forward and loss; the reversible engine keeps its residual
        stream in fp32 under it."""
        if self.precision == "fp32":
            return nullcontext()
        device = next(self.model.parameters()).device
        return torch.autocast(device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def forward(self, x):
        raise NotImplementedError

    def backward_and_step(self, loss: torch.Tensor, lr: float) -> bool:
        """Returns False when the step was skipped (non-finite gradients)."""
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Write this rank's share of model + optimizer state into ``directory``."""
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        raise NotImplementedError

    def official_state_dict(self, checkpoint_dir: Optional[Path] = None) -> Optional[Dict[str, torch.Tensor]]:
        """Full fp32 weights under the released key names, on rank 0 (None elsewhere)."""
        return to_official_state_dict(self.model) if self.info.is_main else None


def _match_grad_layout(model: torch.nn.Module) -> None:
    """Give gradients their parameter's strides before DDP copies them into its buckets.

    Kernels may return an equally contiguous gradient with another stride on a size-1 dim (the
    CPU depthwise conv backward does, for (C, 1, k, k) weights); DDP then warns on every step and
    takes a slower copy path."""
    from ..reversible.lean_block import like_param

    for p in model.parameters():
        if p.requires_grad and 1 in p.shape and p.dim() > 1:
            p.register_hook(lambda g, p=p: like_param(g, p))


class LocalBackend(Backend):
    """One process, or DDP across processes; AdamW from torch."""

    def __init__(self, model, info, optimizer: str, weight_decay: float, clip_grad: Optional[float], device,
                 layer_decay: float = 1.0, precision: str = "fp32") -> None:
        super().__init__(model.to(device), info, precision)
        self.name = "ddp" if info.world_size > 1 else "single"
        self.net = model
        if info.world_size > 1:
            _match_grad_layout(model)
            ids = [device.index] if device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.optimizer = make_optimizer(model, optimizer, weight_decay, layer_decay)
        self.clip = clip_grad
        # fp16 needs loss scaling; bf16 has fp32's range
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def forward(self, x):
        return self.net(x)

    def backward_and_step(self, loss, lr):
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip or float("inf"))
        self.last_grad_norm = float(norm)
        if self.scaler is not None:  # skips the step itself on inf/nan and lowers the scale
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return self.scaler.get_scale() >= scale
        if not math.isfinite(self.last_grad_norm):  # DDP: the same all-reduced norm on every rank
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.step()
        return True

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
    def __init__(self, model, info, ds_config: Dict[str, Any], optimizer: str, weight_decay: float,
                 layer_decay: float = 1.0, precision: str = "fp32") -> None:
        import deepspeed

        super().__init__(model, info, precision)
        stage = zero_stage(ds_config)
        self.name = f"zero{stage}"
        opt = make_optimizer(model, optimizer, weight_decay, layer_decay)
        self.ds_config = ds_config
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        self.stage = stage

    def forward(self, x):
        return self.engine(x)

    def backward_and_step(self, loss, lr):
        set_lr(self.optimizer, lr)
        skipped = self.engine.skipped_steps
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        self.last_grad_norm = None if norm is None else float(norm)
        return self.engine.skipped_steps == skipped  # fp16 overflow: DeepSpeed skipped it

    def save(self, directory):
        # every rank writes its shard; the caller commits the folder once all are done
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)

    def load(self, directory):
        from .nvme_resume import offloads_optimizer_to_nvme, prime_optimizer_state, restore_resident_state

        nvme = offloads_optimizer_to_nvme(self.engine)
        if nvme:
            prime_optimizer_state(self.engine)
        path, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {directory}")
        if nvme:
            restore_resident_state(self.engine, directory)

    def official_state_dict(self, checkpoint_dir=None):
        """Collective under ZeRO-3. From the saved checkpoint (fp32 master weights) where
        DeepSpeed's zero_to_fp32 can read it; with NVMe offload its checkpoint holds only part of
        the flat fp32 groups ("consumed N numels out of M"), so the live weights are gathered
        instead, one parameter at a time."""
        if self.stage < 3:
            return super().official_state_dict()
        from ..models.official import _to_official_key, rename_to_official

        inter_supv = self.model.config.inter_supv
        zc = self.ds_config.get("zero_optimization", {})
        on_nvme = any(zc.get(k, {}).get("device") == "nvme" for k in ("offload_param", "offload_optimizer"))
        if on_nvme or checkpoint_dir is None:
            import deepspeed

            out = {}
            for name, p in self.model.named_parameters():
                with deepspeed.zero.GatheredParameters([p]):
                    if self.info.is_main:
                        out[_to_official_key(name, inter_supv)] = p.detach().float().cpu().clone()
            return out if self.info.is_main else None
        if not self.info.is_main:
            return None
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)
        return rename_to_official(sd, inter_supv)
