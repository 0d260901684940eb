"""One contract over the ways a model is trained: a single process, DDP, a DeepSpeed engine
(ZeRO-1/2/3, offload) and the column pipeline (``pipeline/backend.py``). The Trainer calls

- ``forward_backward(micro_batches, loss_fn) -> StepLoss``: gradients of this rank's batch,
  given as micro-batches, accumulated and averaged over the data-parallel replicas;
- ``step(lr) -> applied``: clip, check the gradients are finite, update, clear;

and never talks to the engines. Clipping and the finite check live in ``Backend.apply_update``
(DeepSpeed does both inside its own step, configured from the same training config).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import randomness
from ..files import atomic_save, save_checksummed
from ..models.column import Fusion
from ..models.heads import Classifier
from ..models.layers import ConvNeXtBlock
from ..models.official import rename_to_official, to_official_key, to_official_state_dict
from . import comm
from .distributed import DistInfo
from .ds_config import zero_stage
from .optimizer_step import fused_adamw_step, skips_in_kernel
from .zero3_params import coalesce_persistent_gather

# (images, targets) or (images, targets, SampleKeys): the keys make drop path layout-free
MicroBatch = Tuple[torch.Tensor, ...]
LossFn = Callable[..., Tuple[torch.Tensor, Dict[str, torch.Tensor]]]  # (out, targets, images) -> (loss, parts)
OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]
Applied = Union[bool, torch.Tensor]  # a step's outcome: a host bool, or a 0-d bool tensor on the device


@dataclass
class StepLoss:
    """The step's loss and its terms, averaged over the global batch (every rank holds the
    same values). Tensors on the device: reading them is the caller's host sync."""

    loss: torch.Tensor
    parts: Dict[str, torch.Tensor]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each group's LR is ``lr`` times its layer-decay ``lr_scale``."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def replica_mean(loss: torch.Tensor, parts: Dict[str, torch.Tensor], group=None) -> StepLoss:
    """The loss and its terms averaged over the replicas, in one all-reduce (none for one
    replica: no collective inside a captured step, two kernels fewer)."""
    names = sorted(parts)
    stacked = torch.stack([loss.float()] + [parts[k].float() for k in names])
    if comm.world_size(group) > 1:
        stacked = comm.mean(stacked, group)
    return StepLoss(stacked[0], dict(zip(names, stacked[1:])))


class Backend:
    name = "base"

    def __init__(self, model: torch.nn.Module, info: DistInfo, precision: str = "fp32",
                 clip_grad: Optional[float] = None) -> None:
        self.model = model  # the plain module (unwrapped)
        self.info = info
        self.precision = precision
        self.clip_grad = clip_grad
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scaler: Optional[torch.amp.GradScaler] = None
        self.last_grad_norm: Optional[torch.Tensor] = None
        self.last_loss: Optional[torch.Tensor] = None  # of the last forward_backward (all ranks)
        # off under a captured forward and backward (``cuda_graph.py``): the gradients are the
        # graph's buffers, overwritten by each replay
        self.clear_grads = True

    # ---- the contract --------------------------------------------------------------------

    def forward_backward(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn) -> StepLoss:
        """Each micro-batch's loss is scaled by 1/len(micro_batches), so the gradients are those
        of the mean loss over the rank's batch (the replicas then average them)."""
        n = len(micro_batches)
        share = (lambda t: t) if n == 1 else (lambda t: t / n)  # x / 1 is x: no kernel for it
        total: Optional[torch.Tensor] = None
        parts: Dict[str, torch.Tensor] = {}
        for i, (images, targets, *keys) in enumerate(micro_batches):
            with self.accumulating(last=i == n - 1), randomness.keyed(keys[0] if keys else None):
                with self.autocast():
                    loss, terms = loss_fn(self.forward(images), targets, images)
                self.backward(share(loss))
            total = share(loss.detach()) if total is None else total + share(loss.detach())
            for k, v in terms.items():
                parts[k] = share(v) if k not in parts else parts[k] + share(v)
        result = replica_mean(total, parts)
        self.last_loss = result.loss
        return result

    def step(self, lr: float) -> Applied:
        """Whether the step applied: False where it was skipped (non-finite gradients, on every
        rank). A 0-d bool tensor on the device where the optimizer skips in its kernel (reading
        it waits for the step: the Trainer reads it a step later), else a bool."""
        set_lr(self.optimizer, lr)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = self.trainable()
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        return self.apply_update(params, norm)

    def forward(self, x, **kw):
        """The forward of the wrapped model (training and evaluation)."""
        return self.model(x, **kw)

    # ---- what a backend may change -------------------------------------------------------

    def accumulating(self, last: bool):
        """Around each micro-batch's forward and backward; ``last`` is the accumulation boundary."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def trainable(self) -> List[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def autocast(self):
        """bf16/fp16 autocast around forward and loss; the reversible engine keeps its residual
        stream in fp32 under it."""
        if self.precision == "fp32":
            return nullcontext()
        device = next(self.model.parameters()).device
        return torch.autocast(device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    @property
    def drift(self) -> Optional[float]:
        """The reversible engine's last reconstruction drift (a host sync: log intervals only)."""
        return self.model.drift.last_drift

    def alphas(self) -> Dict[str, torch.Tensor]:
        """Every column's coupling weights by parameter name, on the CPU, on every rank
        (collective under ZeRO-3 and the pipeline)."""
        return {n: p.detach().float().cpu() for n, p in _alphas(self.model).items()}

    @torch.no_grad()
    def reconstructions(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Each decoder's image of ``images`` in [0, 1]: the wrapped model's own forward in
        evaluation mode (no drop path, no random draw) asked for every earlier head; a
        collective wherever forward is (ZeRO-3 gathers the weights as in training)."""
        cfg = self.model.config
        if not cfg.inter_supv:
            return []
        was = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                out = self.forward(images, heads=range(len(cfg.head_columns) - 1))
        finally:
            self.model.train(was)
        return [r.float().sigmoid() for r in out.reconstructions]

    def save(self, directory: Path) -> None:
        """Write this rank's share of model + optimizer state into ``directory``."""
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        raise NotImplementedError

    def official_state_dict(self, checkpoint_dir: Optional[Path] = None) -> Optional[Dict[str, torch.Tensor]]:
        """Full fp32 weights under the released key names, on rank 0 (None elsewhere)."""
        return to_official_state_dict(self.model) if self.info.is_main else None

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state this rank keeps (moments; a shard's under ZeRO)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    def portable_layout(self):
        """What this backend holds of the layout-free checkpoint (``portable_state.py``)."""
        from .portable_state import WholeOnEveryRank

        return WholeOnEveryRank(self.model, self.optimizer, self.info.world_size)

    def export_ema(self, ema) -> Optional[Dict[str, torch.Tensor]]:
        """The whole fp32 EMA under the model's key names, on rank 0 (collective under ZeRO-3)."""
        return ema.full_state_dict(self.info.is_main)

    # ---- shared by the backends that run their own optimizer -----------------------------

    def apply_update(self, params: Sequence[torch.nn.Parameter], norm: torch.Tensor) -> Applied:
        """Clip to ``clip_grad`` by the global norm ``norm``; step unless it or the step's loss
        is not finite (the same values on every rank: all skip together); clear the gradients
        (unless a captured graph owns them: ``clear_grads``).

        Torch's fused AdamW decides the skip in its kernel (``optimizer_step.fused_adamw_step``:
        moments, step counts and weights left as they were), so the host never waits for this
        step's gradients; other optimizers are stepped or not by a host read."""
        self.last_grad_norm = norm
        if self.clip_grad:
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad, norm)
        if self.scaler is not None:  # skips the step itself on inf/nan and lowers the scale
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            applied = self.scaler.get_scale() >= scale
        else:
            checked = norm if self.last_loss is None else torch.stack([norm.float(), self.last_loss.float()])
            finite = torch.isfinite(checked).all()
            if skips_in_kernel(self.optimizer):
                fused_adamw_step(self.optimizer, (~finite).float())
                applied = finite
            else:
                applied = bool(finite)  # a host sync: the skip is decided here
                if applied:
                    self.optimizer.step()
        if self.clear_grads:
            self.optimizer.zero_grad(set_to_none=True)
        return applied


def _alphas(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """Every column's coupling weights, by parameter name."""
    return {n: p for n, p in model.named_parameters() if n.startswith("columns.") and ".alpha" in n}


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
    """One process, or DDP across processes, with the optimizer the Trainer builds."""

    def __init__(self, model, info, make_optimizer: OptimizerFactory, device, precision: str = "fp32",
                 clip_grad: Optional[float] = None) -> None:
        super().__init__(model.to(device), info, precision, clip_grad)
        self.name = "ddp" if info.world_size > 1 else "single"
        self.net = model
        if info.world_size > 1:
            _match_grad_layout(model)
            ids = [device.index] if device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.optimizer = make_optimizer(model)
        # fp16 needs loss scaling; bf16 has fp32's range
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def forward(self, x, **kw):
        return self.net(x, **kw)

    def accumulating(self, last):
        """DDP all-reduces the gradients once, in the last micro-batch's backward."""
        if last or self.net is self.model:
            return nullcontext()
        return self.net.no_sync()

    def save(self, directory):
        if self.info.is_main:
            atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                        directory / "model_optim.pt")

    def load(self, directory):
        state = torch.load(directory / "model_optim.pt", map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


# Fetched whole under ZeRO-3: DeepSpeed hooks every module that holds parameters, and its hook
# work per module (the fetch trace, the release of what the next module does not need) cost
# more host time than the tiny modules' compute: RevCol's ConvNeXt blocks hold five, a
# fusion two or three, a head two. One gather per block instead (the blocks' parameters are
# few, so the memory peak hardly moves).
WHOLE_UNDER_ZERO3 = (ConvNeXtBlock, Fusion, Classifier)


def fetch_whole_blocks(model: torch.nn.Module) -> int:
    """Mark ``WHOLE_UNDER_ZERO3``'s modules as ZeRO-3 leaf modules (before ``deepspeed.initialize``
    installs its hooks); returns how many."""
    from deepspeed.utils import set_z3_leaf_modules

    present = {type(m) for m in model.modules() if isinstance(m, WHOLE_UNDER_ZERO3)}
    return len(set_z3_leaf_modules(model, list(present))) if present else 0


class DeepSpeedBackend(Backend):
    """ZeRO-1/2/3 and offload: DeepSpeed clips (``gradient_clipping``, from train.clip_grad) and
    skips a step whose global gradient norm is not finite, inside ``engine.step()``."""

    def __init__(self, model, info, ds_config: Dict[str, Any], make_optimizer: OptimizerFactory,
                 precision: str = "fp32") -> None:
        import deepspeed

        super().__init__(model, info, precision)
        self.stage = zero_stage(ds_config)
        self.name = f"zero{self.stage}"
        self.ds_config = ds_config
        if self.stage == 3:
            fetch_whole_blocks(model)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model),
                                                                config=ds_config)
        if self.stage == 3:
            # The reversible engine reads every column's alphas in the model's own forward.
            # DeepSpeed adopts such a read as the root module's parameter only if the alpha is
            # partitioned at that moment, and its fetch trace keeps the root's parameters of the
            # recording pass: register them up front, so that the trace is the same whatever a
            # resume (which gathers the persistent ones) or logging left gathered.
            for p in _alphas(model).values():
                deepspeed.zero.register_external_parameter(model, p)
            coalesce_persistent_gather(self.engine.optimizer)  # one all-gather per step, not one per parameter

    def forward(self, x, **kw):
        return self.engine(x, **kw)

    def accumulating(self, last):
        """The loop's accumulation boundary is DeepSpeed's: it reduces in the last backward.
        Required, not a courtesy: DeepSpeed hands the boundary to the ZeRO optimizer from a
        hook on the forward's output tensors, and RevColOutput (a dataclass) hides them, so
        without this call ZeRO-2/3 and offload would not know where the step ends."""
        self.engine.set_gradient_accumulation_boundary(last)
        return nullcontext()

    def backward(self, loss):
        self.engine.backward(loss, scale_wrt_gas=False)  # already divided by the micro-batch count

    def step(self, lr):
        set_lr(self.optimizer, lr)
        skipped = self.engine.skipped_steps
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        self.last_grad_norm = None if norm is None else torch.as_tensor(norm)
        return self.engine.skipped_steps == skipped  # non-finite gradients: DeepSpeed skipped it

    def portable_layout(self):
        from .portable_state import ZeroShards

        return ZeroShards(self.engine, self.stage, self.info.world_size)

    def alphas(self):
        if self.stage < 3:
            return super().alphas()
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        named = _alphas(self.model)
        # only the partitioned ones: on exit GatheredParameters partitions all it was given,
        # ZeRO-3's persistent (always gathered) small parameters too, which the next forward
        # would then meet partitioned (the same list on every rank: the collective matches)
        missing = [p for p in named.values() if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        with deepspeed.zero.GatheredParameters(missing, modifier_rank=None):
            return {n: p.detach().float().cpu() for n, p in named.items()}

    def save(self, directory):
        """Every rank writes its shard; the caller commits the folder once all are done. DeepSpeed's
        files go through ``files.save_checksummed`` (size and CRC-32 recorded while writing, or a
        host copy for an asynchronous checkpoint) instead of its engine's plain torch.save."""
        writer = self.engine.checkpoint_engine
        zipfile = getattr(writer, "zipfile_serialization", True)
        writer.save = lambda state_dict, path: save_checksummed(state_dict, path,
                                                               _use_new_zipfile_serialization=zipfile)
        try:
            self.engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)
        finally:
            del writer.save  # the engine's own method again

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

    def _fp32_masters(self) -> Optional[Dict[str, torch.Tensor]]:
        from deepspeed.utils import safe_get_full_fp32_param

        inter_supv = self.model.config.inter_supv
        params = dict(self.model.named_parameters())
        out = {}
        for name, t in self.model.state_dict(keep_vars=True).items():
            master = safe_get_full_fp32_param(t) if name in params else None  # collective
            value = (master if master is not None else t.detach()).float() if t.is_floating_point() else t.detach()
            if self.info.is_main:
                out[to_official_key(name, inter_supv)] = value.cpu().clone()
        return out if self.info.is_main else None

    def official_state_dict(self, checkpoint_dir=None):
        """Collective under ZeRO-3. From the saved checkpoint (fp32 master weights) where
        DeepSpeed's zero_to_fp32 can read it; with NVMe offload its checkpoint holds only part of
        the flat fp32 groups ("consumed N numels out of M"), so the live weights are gathered
        instead, one parameter at a time. ZeRO-1/2: from the optimizer's fp32 master copies
        (under bf16 the module holds bf16 working copies), a collective over the ranks."""
        if self.stage < 3:
            return self._fp32_masters()
        inter_supv = self.model.config.inter_supv
        zc = self.ds_config.get("zero_optimization", {})
        on_nvme = any(zc.get(k, {}).get("device") == "nvme" for k in ("offload_param", "offload_optimizer"))
        if on_nvme or checkpoint_dir is None:
            from deepspeed.utils import safe_get_full_fp32_param

            out = {}
            for name, p in self.model.named_parameters():  # the fp32 masters (swapped in where on NVMe)
                master = safe_get_full_fp32_param(p) if p.requires_grad else None
                if master is None:
                    import deepspeed

                    with deepspeed.zero.GatheredParameters([p]):
                        master = p.detach().float()
                if self.info.is_main:
                    out[to_official_key(name, inter_supv)] = master.float().cpu().clone()
            return out if self.info.is_main else None
        if not self.info.is_main:
            return None
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)
        return rename_to_official(sd, inter_supv)
