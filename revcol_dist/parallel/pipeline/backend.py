"""The Backend contract over the column pipeline: forward and backward of the micro-batches
interleaved (1F1B), an optimizer over this stage's parameters, checkpoints written per stage
by the first replica, and the released-format export gathered on rank 0."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

from ...files import atomic_save
from ...models.official import rename_to_official
from ...models.revcol import RevColOutput
from .. import comm
from ..backends import Backend, StepLoss, set_lr
from .engine import PipelineEngine
from .partition import column_modules


class PipelineBackend(Backend):
    def __init__(self, model, info, pipe, make_optimizer, precision: str = "fp32", clip_grad: Optional[float] = None,
                 res: int = 224, device=None, seed: Optional[int] = None, log=None) -> None:
        super().__init__(model, info, precision, clip_grad)
        self.engine = PipelineEngine(model, pipe.stages, pipe.micro_batches, cost=pipe.cost, res=res,
                                     zero_stash=pipe.zero_stash, check_every=pipe.check_every,
                                     drift_tolerance=pipe.drift_tolerance, precision=precision, device=device,
                                     zero=pipe.zero, seed=seed, log=log)
        self.zero = self.engine.zero
        self.name = f"pipeline{pipe.stages}x{self.engine.D}" + (f"-zero{pipe.zero}" if pipe.zero else "")
        # the engine released other stages' weights (requires_grad False): only ours are here;
        # under pipeline.zero only this replica's run of them
        self.optimizer = make_optimizer(model) if self.zero is None else make_optimizer(model, names=self.zero.owned_names)

    def forward_backward(self, micro_batches, loss_fn) -> StepLoss:
        """Every stage computes the terms of the heads it holds with ``loss_fn``; their sum is
        the single-process loss."""
        values = self.engine.forward_backward(micro_batches, loss_fn).float()
        self.last_loss = values[0]
        return StepLoss(values[0], dict(zip(self.engine.part_names, values[1:])))

    def step(self, lr):
        set_lr(self.optimizer, lr)
        if self.zero is None:
            return self.apply_update(self.engine.params, self._global_grad_norm())
        applied = self.apply_update(self.zero.owned, self._global_grad_norm())
        self.engine.zero_grad()  # the other runs' gradients (pipeline.zero=1) before the broadcasts' copies
        self.zero.gather_weights()  # the owners' new weights to every replica
        return applied

    def _global_grad_norm(self) -> torch.Tensor:
        """Over every stage: replicas hold equal (averaged) gradients, so the world sum counts
        each stage D times (once under pipeline.zero=2: only the owner keeps a gradient)."""
        sq = torch.zeros((), dtype=torch.float64, device=self.engine.device)
        for p in self.engine.parameters():
            if p.grad is not None:
                sq += p.grad.double().pow(2).sum()
        held = self.engine.D if self.zero is None else self.zero.norm_divisor()
        return (comm.all_reduce(sq) / held).sqrt().float()

    def forward(self, x, **_):
        logits = self.engine.forward_eval(x)
        return None if logits is None else RevColOutput(logits)

    def reconstructions(self, images):
        return []  # the decoders sit on several stages: not drawn for the pipeline

    @property
    def drift(self):
        return self.engine.last_drift

    def alphas(self):
        """Each stage holds its own columns' alphas: gathered from every stage."""
        mine = {k: v for k, v in super().alphas().items() if v.numel()}
        merged: Dict[str, torch.Tensor] = {}
        for part in comm.all_gather_object(mine):
            merged.update(part)
        return merged

    def portable_layout(self):
        from ..portable_state import PipelineStage

        e = self.engine
        names = {id(p): n for n, p in self.model.named_parameters()}
        modules = column_modules(self.model)
        stage_of = {names[id(p)]: s for s, cols in enumerate(e.partition) for c in cols
                    for m in modules[c] for p in m.parameters()}
        owners = None if self.zero is None else {n: self.zero.owner_rank(n) for n in self.zero.names}
        return PipelineStage(self.model, self.optimizer, e.stage, e.S, e.D, stage_of, owners)

    def _stage_file(self, directory: Path) -> Path:
        return Path(directory) / f"pipeline_stage{self.engine.stage:03d}.pt"

    def _shard_file(self, directory: Path) -> Path:
        """Under pipeline.zero every replica writes the optimizer state it owns."""
        return Path(directory) / f"pipeline_stage{self.engine.stage:03d}_replica{self.engine.replica:03d}_optim.pt"

    def save(self, directory):
        if self.zero is not None:
            atomic_save({"optimizer": self.optimizer.state_dict(), "owned": self.zero.owned_names},
                        self._shard_file(directory))
        if self.engine.replica == 0:  # the replicas hold the same weights (and, without ZeRO, optimizer state)
            names = {id(p): n for n, p in self.model.named_parameters()}
            atomic_save({"params": {names[id(p)]: p.detach() for p in self.engine.parameters()},
                         "optimizer": self.optimizer.state_dict() if self.zero is None else None,
                         "partition": self.engine.partition,
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
        optimizer = state["optimizer"]
        if self.zero is not None:
            shard = torch.load(self._shard_file(directory), map_location="cpu", weights_only=False)
            if shard["owned"] != self.zero.owned_names:
                raise ValueError(f"{directory} was written with another pipeline.zero sharding: resume with "
                                 f"the same replicas, or from its portable form")
            optimizer = shard["optimizer"]
        if optimizer is None:
            raise ValueError(f"{directory} was written with pipeline.zero on: resume with it, or from its "
                             f"portable form")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["params"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(optimizer)
        self.engine.zero_stash, self.engine.steps = state["zero_stash"], state["steps"]
        self.engine.last_drift = state["drift"]

    def gather_to_main(self, named) -> Optional[dict]:
        """{name: tensor} of every stage's parameters (taken from ``named`` where this stage owns
        the name), merged on rank 0 from the first replica, in the model's parameter order."""
        owned = {n for n, p in self.model.named_parameters() if p.requires_grad}
        mine = {n: t.detach().cpu().clone() for n, t in named.items() if n in owned} if self.engine.replica == 0 else {}
        parts = comm.gather_object(mine, dst=0)
        if not self.info.is_main:
            return None
        merged = {}
        for part in parts:
            merged.update(part)
        return {n: merged[n] for n, _ in self.model.named_parameters() if n in merged}

    def export_ema(self, ema):
        """Every stage averages its own weights: gathered like the weights."""
        return self.gather_to_main(dict(zip(ema.names, ema.shadow)))

    def official_state_dict(self, checkpoint_dir=None):
        """Every stage's weights, gathered on rank 0 from the first replica."""
        merged = self.gather_to_main(dict(self.model.named_parameters()))
        if merged is None:
            return None
        buffers = dict(self.model.named_buffers())
        full = {n: merged[n] if n in merged else buffers[n].detach().clone()
                for n in self.model.state_dict(keep_vars=True)}
        return rename_to_official(full, self.model.config.inter_supv)
