"""What each layout holds of the layout-free checkpoint (``portable.py``), and how it gets it.

Every backend holds the same run in a different shape: a single process or DDP has every
tensor whole; ZeRO-1/2 the weights whole and a fragment of each fp32 master and moment;
ZeRO-3 a flat partition of each; a pipeline stage its own columns' tensors whole. An adapter
per shape yields the full fp32 tensors in one global order (all ranks iterate together:
ZeRO's gathers are collectives) and loads them back reading only its own elements.

Keys: ``param/<name>`` (fp32 weights: DeepSpeed's masters), ``<state>/<name>`` for the
optimizer's per-parameter state (AdamW: exp_avg, exp_avg_sq; SGD: momentum_buffer),
``ema/<name>``."""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import torch

Item = Tuple[str, Optional[torch.Tensor], Sequence[int]]  # key, the full tensor here (or None), who has it


def state_keys(optimizer: torch.optim.Optimizer) -> List[str]:
    """The per-parameter tensors the optimizer keeps (its step count is in the meta)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the client optimizer
    if isinstance(inner, torch.optim.SGD):
        return ["momentum_buffer"] if any(g.get("momentum", 0) for g in inner.param_groups) else []
    return ["exp_avg", "exp_avg_sq"]


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """Applied updates, from the optimizer's own counter (0 before the first)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


@torch.no_grad()
def prime(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> None:
    """Create the optimizer's per-parameter state (torch makes it at the first step) with one
    step at learning rate 0 on zero gradients: the weights do not move (AdamW's decay is lr x
    wd), and the state is then overwritten with the checkpoint's."""
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    kept = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, g in zip(params, kept):
        p.grad = g
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr


def set_optimizer_steps(optimizer: torch.optim.Optimizer, steps: int) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if "step" in state:
            step = state["step"]  # fused optimizers keep it on the parameter's device, in fp32
            state["step"] = torch.full_like(step, float(steps)) if torch.is_tensor(step) else steps


def _state(optimizer, p: torch.Tensor, key: str) -> torch.Tensor:
    """``p``'s optimizer state ``key`` in fp32 (zeros before the first step)."""
    state = optimizer.state.get(p, {})
    return state[key].float() if key in state else torch.zeros_like(p, dtype=torch.float32)


def _optimized(optimizer) -> List[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


class WholeOnEveryRank:
    """One process or DDP: every tensor whole everywhere; writes are spread over the ranks."""

    def __init__(self, model: torch.nn.Module, optimizer, world_size: int) -> None:
        self.model, self.optimizer, self.world = model, optimizer, world_size

    def params(self) -> List[Tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def items(self) -> Iterator[Item]:
        everyone = range(self.world)
        keys = state_keys(self.optimizer)
        for name, p in self.params():
            yield f"param/{name}", p.detach().float(), everyone
            for k in keys:
                yield f"{k}/{name}", _state(self.optimizer, p, k), everyone

    def owned(self, name: str, p: torch.nn.Parameter) -> Optional[Tuple[int, int]]:
        """Elements [start, stop) of the flattened parameter this rank keeps (None: none)."""
        return 0, p.numel()

    @torch.no_grad()
    def load(self, reader, steps: int) -> None:
        """The weights of every parameter here; the optimizer state of those this rank's
        optimizer steps (all of them, or a pipeline.zero shard's)."""
        keys = state_keys(self.optimizer)
        stepped = {id(p) for p in _optimized(self.optimizer)}
        if keys:
            prime(self.optimizer, _optimized(self.optimizer))
        for name, p in self.params():
            p.copy_(reader.full(f"param/{name}"))
            if id(p) in stepped:
                for k in keys:
                    self.optimizer.state[p][k].copy_(reader.full(f"{k}/{name}"))
        set_optimizer_steps(self.optimizer, steps)


class PipelineStage(WholeOnEveryRank):
    """A stage's own columns, whole on each of its replicas; the other stages' are not here.
    ``owners`` (pipeline.zero): {name: the one global rank keeping its optimizer state}."""

    def __init__(self, model, optimizer, stage: int, stages: int, replicas: int, names_by_stage,
                 owners: Optional[dict] = None) -> None:
        super().__init__(model, optimizer, 1)
        self.stage, self.stages, self.replicas = stage, stages, replicas
        self.names_by_stage = names_by_stage  # {name: stage}, for every parameter of the model
        self.owners = owners

    def items(self) -> Iterator[Item]:
        mine = dict(self.params())
        stepped = {id(p) for p in _optimized(self.optimizer)}
        keys = state_keys(self.optimizer)
        for name, _ in self.model.named_parameters():
            s = self.names_by_stage[name]
            holders = [r * self.stages + s for r in range(self.replicas)]
            p = mine.get(name)
            yield f"param/{name}", None if p is None else p.detach().float(), holders
            if self.owners is not None and p is not None:  # a sharded stage: state on its owner only
                holders = [self.owners[name]]
            for k in keys:
                here = p is not None and id(p) in stepped
                yield f"{k}/{name}", _state(self.optimizer, p, k) if here else None, holders

    def owned(self, name, p):
        return (0, p.numel()) if self.names_by_stage[name] == self.stage else None


class ZeroShards:
    """DeepSpeed ZeRO-1/2/3: full tensors gathered one parameter at a time (collective);
    loaded into each rank's fragment (ZeRO-1/2) or partition (ZeRO-3), read from the file
    range by range."""

    def __init__(self, engine, stage: int, world_size: int) -> None:
        self.engine, self.stage, self.world = engine, stage, world_size
        self.model = engine.module

    def _keys(self) -> List[str]:
        return state_keys(self.engine.optimizer)

    def items(self) -> Iterator[Item]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        everyone = range(self.world)
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            yield f"param/{name}", safe_get_full_fp32_param(p).float(), everyone
            for k in self._keys():
                full = safe_get_full_optimizer_state(p, k) if self.stage == 3 else self._full_state(p, k)
                yield f"{k}/{name}", full.float(), everyone

    def _fragment_state(self, p, key: str) -> Optional[torch.Tensor]:
        """ZeRO-1/2: this rank's fragment of ``p``'s optimizer state ``key``, found through the
        flat fp32 partition the fragment lives in (DeepSpeed links its own view of it only
        after its first step, and not for every group). None where there is none yet."""
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return None
        frag = mapping.get_hp_fragment()
        inner = self.engine.optimizer.optimizer
        for group in inner.param_groups:
            for flat in group["params"]:
                if flat.untyped_storage().data_ptr() != frag.untyped_storage().data_ptr():
                    continue
                offset = frag.storage_offset() - flat.storage_offset()
                if 0 <= offset and offset + frag.numel() <= flat.numel():
                    state = inner.state.get(flat, {})
                    return state[key].reshape(-1).narrow(0, offset, frag.numel()) if key in state else None
        return None

    def _full_state(self, p, key: str) -> torch.Tensor:
        """The whole of ``p``'s optimizer state ``key`` on every rank: each rank puts in its
        fragment, one all-reduce (zeros where no rank has state yet)."""
        from . import comm

        full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        mapping = getattr(p, "_hp_mapping", None)
        frag = self._fragment_state(p, key)
        if frag is not None:
            a = mapping.lp_fragment_address
            full.narrow(0, a.start, a.numel).copy_(frag)
        return comm.all_reduce_(full, group=getattr(p, "_dp_group", None)).view(p.shape)

    def _dp_rank(self) -> int:
        from . import comm

        return comm.rank()

    def owned(self, name: str, p: torch.nn.Parameter) -> Optional[Tuple[int, int]]:
        if self.stage < 3:
            return 0, p.numel()  # the weights are whole on every rank (the EMA follows them)
        size = p.ds_tensor.numel()
        start = self._dp_rank() * size
        return min(start, p.ds_numel), min(start + size, p.ds_numel)

    @torch.no_grad()
    def load(self, reader, steps: int) -> None:
        opt = self.engine.optimizer
        if self.stage < 3:
            self._load_fragments(reader, opt)
        else:
            self._load_partitions(reader, opt)
        set_optimizer_steps(opt, steps)

    def _load_fragments(self, reader, opt) -> None:
        """ZeRO-1/2: the fp32 master's and moments' fragment of each parameter, and the whole
        working weights (every rank holds them)."""
        prime(opt.optimizer, [flat for g in opt.optimizer.param_groups for flat in g["params"]])
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            full = reader.full(f"param/{name}")
            p.data.copy_(full.to(p.dtype))
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                continue
            start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
            mapping.get_hp_fragment().data.copy_(full.reshape(-1)[start:start + numel])
            for k in self._keys():
                self._fragment_state(p, k).copy_(reader.flat_range(f"{k}/{name}", start, start + numel))

    def _load_partitions(self, reader, opt) -> None:
        """ZeRO-3: each rank reads its partition's elements only (padded to the partition)."""
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        from .nvme_resume import prime_optimizer_state

        prime_optimizer_state(self.engine)
        opt.checkpoint_event_prologue()  # whole copies of small parameters released; regathered below
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            start, stop = self.owned(name, p)
            size = p.ds_tensor.numel()

            def part(key: str) -> torch.Tensor:
                out = torch.zeros(size, dtype=torch.float32)
                if stop > start:
                    out[: stop - start] = reader.flat_range(key, start, stop)
                return out

            safe_set_local_fp32_param(p, part(f"param/{name}").to(p.ds_tensor.device))
            for k in self._keys():
                safe_set_local_optimizer_state(p, part(f"{k}/{name}").to(p.ds_tensor.device), k)
        for i in range(len(opt.fp32_partitioned_groups_flat)):  # masters -> working copies
            opt._reassign_or_swap_out_partitioned_parameters(i)
        opt.checkpoint_event_epilogue()


def ema_items(ema, layout) -> Iterator[Item]:
    """The EMA's full fp32 shadows, one parameter at a time (collective under ZeRO-3)."""
    for i, name in enumerate(ema.names):
        p = ema.params[i]
        if not p.requires_grad:
            continue
        holders = range(getattr(layout, "world", 1))
        if isinstance(layout, PipelineStage):
            s = layout.names_by_stage[name]
            holders = [r * layout.stages + s for r in range(layout.replicas)]
            yield f"ema/{name}", (ema.shadow[i] if s == layout.stage else None), holders
            continue
        yield f"ema/{name}", ema.full(i), holders


@torch.no_grad()
def load_ema(ema, layout, reader) -> None:
    for i, name in enumerate(ema.names):
        p = ema.params[i]
        if not p.requires_grad:
            continue
        rng = layout.owned(name, p)
        if rng is None:
            continue
        start, stop = rng
        shadow = ema.shadow[i].view(-1)
        shadow.zero_()
        shadow[: stop - start] = reader.flat_range(f"ema/{name}", start, stop)

