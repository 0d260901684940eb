"""The training loop's Backend over the column pipeline: one fused forward+backward per step
(1F1B over micro-batches), an optimizer over this stage's parameters, checkpoints written
per stage by the first replica, and the released-format export gathered on rank 0."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ...engine.optim import make_optimizer, set_lr
from ..backends import Backend
from .engine import PipelineEngine


class PipelineBackend(Backend):
    fused = True  # train_step runs forward and backward together

    def __init__(self, model, info, pipe, optimizer: str, weight_decay: float, clip_grad: Optional[float],
                 layer_decay: float = 1.0, precision: str = "fp32", res: int = 224,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), log=None) -> None:
        super().__init__(model, info, precision)
        self.engine = PipelineEngine(model, pipe.stages, pipe.micro_batches, cost=pipe.cost, res=res,
                                     zero_stash=pipe.zero_stash, check_every=pipe.check_every,
                                     drift_tolerance=pipe.drift_tolerance, precision=precision, mean=mean, std=std,
                                     log=log)
        self.name = f"pipeline{pipe.stages}x{self.engine.D}"
        self.clip_grad = clip_grad
        # the engine released other stages' weights (requires_grad False): only ours are here
        self.optimizer = make_optimizer(model, optimizer, weight_decay, layer_decay)

    def train_step(self, images, targets, lr: float, label_smoothing: float = 0.0):
        """Returns (mean loss over replicas, whether the optimizer stepped)."""
        self.engine.label_smoothing = label_smoothing
        self.engine.zero_grad()
        loss = self.engine.train_step(images, targets)
        if not math.isfinite(loss):  # the same on every rank: the loss was all-reduced
            self.engine.zero_grad()
            return loss, False
        norm = self._global_grad_norm()
        self.last_grad_norm = norm
        if not math.isfinite(norm):
            self.engine.zero_grad()
            return loss, False
        if self.clip_grad is not None and norm > self.clip_grad:
            for p in self.engine.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.clip_grad / (norm + 1e-6))
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        return loss, True

    def _global_grad_norm(self) -> float:
        """Over every stage: replicas hold equal (averaged) gradients, so the world sum counts
        each stage D times."""
        sq = torch.zeros((), dtype=torch.float64, device=self.engine.device)
        for p in self.engine.parameters():
            if p.grad is not None:
                sq += p.grad.double().pow(2).sum()
        dist.all_reduce(sq)
        return float(sq / self.engine.D) ** 0.5

    def forward(self, x):
        from ...models.revcol import RevColOutput

        logits = self.engine.forward_eval(x)
        return None if logits is None else RevColOutput(logits)

    def backward_and_step(self, loss, lr):
        raise RuntimeError("the pipeline runs forward and backward together: call train_step")

    def _stage_file(self, directory: Path) -> Path:
        return Path(directory) / f"pipeline_stage{self.engine.stage:03d}.pt"

    def save(self, directory):
        if self.engine.replica == 0:  # the replicas hold the same weights and optimizer state
            from ...engine.checkpoint import atomic_save

            names = {id(p): n for n, p in self.model.named_parameters()}
            atomic_save({"params": {names[id(p)]: p.detach() for p in self.engine.parameters()},
                         "optimizer": self.optimizer.state_dict(), "partition": self.engine.partition,
                         "drift": self.engine.last_drift, "zero_stash": self.engine.zero_stash,
                         "steps": self.engine.steps}, self._stage_file(directory))

    def load(self, directory):
        path = self._stage_file(directory)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: was {directory} written with pipeline.stages="
                                    f"{self.engine.S}?")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["partition"] != self.engine.partition:
            raise ValueError(f"{directory} was written with the partition {state['partition']}, this run has "
                             f"{self.engine.partition}: resume with the same pipeline.stages and pipeline.cost")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["params"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.engine.zero_stash, self.engine.steps = state["zero_stash"], state["steps"]
        self.engine.last_drift = state["drift"]

    def gather_to_main(self, named) -> Optional[dict]:
        """{name: tensor} of every stage's parameters (taken from ``named`` where this stage owns
        the name), merged on rank 0 from the first replica, in the model's parameter order."""
        owned = {n for n, p in self.model.named_parameters() if p.requires_grad}
        mine = {n: t.detach().cpu().clone() for n, t in named.items() if n in owned} if self.engine.replica == 0 else {}
        parts = [None] * dist.get_world_size() if self.info.is_main else None
        dist.gather_object(mine, parts, dst=0)
        if not self.info.is_main:
            return None
        merged = {}
        for part in parts:
            merged.update(part)
        return {n: merged[n] for n, _ in self.model.named_parameters() if n in merged}

    def official_state_dict(self, checkpoint_dir=None):
        """Every stage's weights, gathered on rank 0 from the first replica."""
        from ...models.official import rename_to_official

        merged = self.gather_to_main(dict(self.model.named_parameters()))
        if merged is None:
            return None
        buffers = dict(self.model.named_buffers())
        full = {n: merged[n] if n in merged else buffers[n].detach().clone()
                for n in self.model.state_dict(keep_vars=True)}
        return rename_to_official(full, self.model.config.inter_supv)
