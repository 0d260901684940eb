"""A RevCol split over pipeline stages (columns, with the stem on the first stage and each
head on the stage of the column it reads), 1F1B over micro-batches, data parallel replicas of
the whole pipeline. Ranks are laid out replica-major: rank = replica * stages + stage.

Between stages travel the stem output x and the four maps of the stage's last column. Each
stage computes the loss terms of the heads it holds (labels and images are local: every rank
reads the same batch), so the pipeline's loss is the sum of the stages' losses and equals
the single-process loss.

Memory: with the reversible engine a stage keeps, per micro-batch in flight, x and its
outputs (the next stage's inputs are reconstructed, not kept). With ``zero_stash`` it does
not keep its outputs either: the next stage sends them back, reconstructed, with their
gradients. Every ``check_every`` steps the outputs are kept anyway and compared with what
comes back; above ``drift_tolerance`` zero-stash is switched off for the rest of the run.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ... import randomness
from ...models.init import materialize
from ...monitor.timing import DeviceTimer
from ...reversible import Segment
from .. import comm
from .partition import column_modules, partition_table, split_columns
from .schedule import Transfer, p2p_slots
from .zero import StageZero

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_HEADER = 6  # dtype, ndim, up to 4 sizes per tensor


class _Box:
    grads: Sequence[torch.Tensor] = ()


class _GradTap(torch.autograd.Function):
    """Received tensors enter the stage's graph here; their gradients are caught for the stage
    before. Only the anchor is a leaf, so nothing in the graph holds the received storage."""

    @staticmethod
    def forward(ctx, box, anchor, *tensors):
        ctx.box = box
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.box.grads = grads
        return (None, None, *[None] * len(grads))


class _GradSink(torch.autograd.Function):
    """The stage's sent outputs end here; backward hands them the next stage's gradients.
    Saves nothing: the outputs themselves need not outlive their sending."""

    @staticmethod
    def forward(ctx, box, *tensors):
        ctx.box = box
        return tensors[0].new_zeros(())

    @staticmethod
    def backward(ctx, _):
        return (None, *ctx.box.grads)


@dataclasses.dataclass
class _InFlight:
    loss: Optional[torch.Tensor]
    sink: Optional[torch.Tensor]
    box_in: Optional[_Box]
    box_out: Optional[_Box]
    segment: Optional[Segment]
    sent: List[tuple]  # (shape, dtype) of the outputs, for the gradients coming back


class PipelineEngine:
    def __init__(self, model, stages: int, micro_batches: int, *, cost: str = "params", res: int = 224,
                 zero_stash: bool = False, check_every: int = 50, drift_tolerance: float = 1e-3,
                 precision: str = "fp32", device: Optional[torch.device] = None, zero: int = 0,
                 seed: Optional[int] = None, log: Optional[Callable[[str], None]] = print) -> None:
        if not comm.initialized():
            raise RuntimeError("PipelineEngine needs torch.distributed initialised (launch with torchrun)")
        world, rank = comm.world_size(), comm.rank()
        if world % stages:
            raise ValueError(f"world size {world} is not a multiple of {stages} pipeline stages")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        if zero_stash and not model.reversible:
            raise ValueError("zero_stash reconstructs stage outputs: it needs model.reversible = True")
        self.model, self.S, self.D, self.M = model, stages, world // stages, micro_batches
        self.stage, self.replica = rank % stages, rank // stages
        self.first, self.last = self.stage == 0, self.stage == stages - 1
        self.prev_rank = rank - 1 if not self.first else None
        self.next_rank = rank + 1 if not self.last else None
        self.dp_group = None
        for s in range(stages):  # every rank creates every group, in the same order
            g = comm.new_group([d * stages + s for d in range(self.D)])
            if s == self.stage:
                self.dp_group = g
        self.partition, costs = split_columns(model, stages, cost, res)
        self.columns = self.partition[self.stage]
        if rank == 0 and log is not None:
            log(partition_table(self.partition, costs, cost))
        owned = {id(p) for c in self.columns for m in column_modules(model)[c] for p in m.parameters()}
        cfg = model.config
        final = len(cfg.head_columns) - 1 if cfg.inter_supv else 0
        # the heads this stage computes in training: earlier heads on the columns it runs, the final on the last
        self.heads = [h for h, c in enumerate(cfg.head_columns[:-1]) if cfg.inter_supv and c in self.columns]
        self.heads += [final] if self.last else []
        self.final_head = final
        self.part_names = ["loss_cls_final"] + [f"loss_{k}_{i}" for i in range(final) for k in ("cls", "rec")]
        # this stage's modules only go to the device; messages, statistics and the anchor live
        # there too (NCCL moves device tensors only)
        meta = any(p.is_meta for p in model.parameters())
        self.device = torch.device(device) if device is not None else \
            (torch.device("cpu") if meta else next(model.parameters()).device)
        mine = [m for c in self.columns for m in column_modules(model)[c]]
        if meta:  # built on the meta device: only this stage's modules ever get storage
            if seed is None:
                raise ValueError("a model on the meta device needs the seed its weights are keyed by")
            materialize(model, mine, seed, self.device)
        else:
            for p in model.parameters():  # other stages' weights: not needed here
                if id(p) not in owned:
                    p.data = p.data.new_empty(0)
            model.to(self.device)
        owned = {id(p) for m in mine for p in m.parameters()}
        for p in model.parameters():
            if id(p) not in owned:
                p.requires_grad_(False)
        names = {id(p): n for n, p in model.named_parameters()}
        self.params = [p for p in model.parameters() if id(p) in owned]
        self.zero = StageZero(self.params, [names[id(p)] for p in self.params], zero, self.dp_group,
                              [d * stages + self.stage for d in range(self.D)], self.replica) if zero else None
        self.zero_stash, self.check_every, self.drift_tolerance = zero_stash, check_every, drift_tolerance
        self.precision = precision
        self.steps = 0
        self.last_drift: Optional[float] = None
        self.anchor = torch.zeros((), requires_grad=True, device=self.device)
        # the stage group's communicator is made now, not at its first use inside a backward hook
        comm.all_reduce_(torch.zeros(1, device=self.device), group=self.dp_group)
        self._wait = DeviceTimer(self.device)
        # the (shape, dtype) of the activations for each micro-batch shape: a header crosses once
        self._specs_sent: Dict[tuple, list] = {}
        self._specs_received: Dict[tuple, list] = {}
        self._log = log if rank == 0 else None
        comm.barrier()  # every rank in the group before the first batched point-to-point transfer

    # ---- one training step -------------------------------------------------------------

    def parameters(self):
        return iter(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def forward_backward(self, micro_batches, loss_fn) -> torch.Tensor:
        """Forward and backward of this replica's batch, given as M micro-batches of (images,
        targets); gradients are averaged over the replicas and left in .grad. Returns
        [loss, *terms in ``part_names``], each the mean over the global batch (on every rank)."""
        if len(micro_batches) != self.M:
            raise ValueError(f"{len(micro_batches)} micro-batches given; pipeline.micro_batches={self.M}")
        self.model.train()
        check = self.zero_stash and self.steps % self.check_every == 0
        self._check = check
        self._inflight: Dict[int, _InFlight] = {}
        self._outbox: Dict[Transfer, List[torch.Tensor]] = {}  # the last action's outputs, for the next slot
        self._parts = torch.zeros(len(self.part_names) + 1, dtype=torch.float64, device=self.device)
        self._drift = torch.zeros((), dtype=torch.float64, device=self.device)
        self._wait.reset()
        if self.zero is not None:
            self.zero.prepare()  # gradients accumulate into the runs' flat buffers
        t0 = time.perf_counter()
        for slot in p2p_slots(self.stage, self.S, self.M):
            received = self._transfer(slot, micro_batches)
            if slot.action is None:
                break
            kind, m = slot.action
            if kind == "F":
                images, targets, *keys = micro_batches[m]
                with randomness.keyed(keys[0] if keys else None):  # the backward's replay keeps them
                    self._forward(images, targets, m, loss_fn, received)
            else:
                self._backward(m, received)
        self._step_s = time.perf_counter() - t0
        self._average_gradients()
        parts = comm.all_reduce(self._parts) / self.D  # every stage's share, every replica
        if check:
            self.last_drift = float(comm.all_reduce(self._drift, "max"))
            if self.last_drift > self.drift_tolerance:
                self.zero_stash = False
                if self._log:
                    self._log(f"pipeline: reconstructed stage outputs drift {self.last_drift:.2e} > "
                              f"{self.drift_tolerance:.0e}: zero-stash off, stages keep their outputs")
        self.steps += 1
        return parts

    @torch.no_grad()
    def forward_eval(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """Logits of the final head on the last stage (None on the others), micro-batch by
        micro-batch through the stages; no graph, nothing kept."""
        model = self.model
        was = model.training
        model.eval()
        self._wait.reset()
        a, b = self.columns[0], self.columns[-1] + 1
        logits = []
        try:
            for chunk in images.chunk(min(self.M, images.shape[0])):
                key = self._key(chunk, "eval")
                with self._autocast():
                    if self.first:
                        x, state = model.forward_stem(chunk), None
                    else:  # forward only: no opposite traffic to pair with
                        x, *state = self._recv_activations(key)
                    state, _ = model.forward_columns(x, a, b, initial=state)
                    if self.last:
                        logits.append(model.forward_heads(state, {}, chunk.shape[-2:]).logits.float())
                if not self.last:
                    out = [x] + list(state)
                    comm.exchange(sends=[(t, self.next_rank) for t in self._with_header(key, out)]).wait()
        finally:
            model.train(was)
        return torch.cat(logits) if logits else None

    @property
    def timing(self) -> Dict[str, float]:
        """The last step's seconds: in all, and waiting for the neighbours (read at log
        intervals: on CUDA it waits for the step's events)."""
        wait = self._wait.total_s()
        step = getattr(self, "_step_s", 0.0)
        if self._wait.cuda:  # the host clock saw launches only: the stream's end is the step's end
            torch.cuda.synchronize(self.device)
        return {"wait_s": wait, "step_s": step, "compute_s": max(step - wait, 0.0)}

    # ---- forward and backward of one micro-batch ---------------------------------------

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        return torch.autocast(self.anchor.device.type, dtype=dtype)

    def _forward(self, images, targets, m: int, loss_fn, received) -> None:
        model = self.model
        a, b = self.columns[0], self.columns[-1] + 1
        box_in = box_out = sink = seg = None
        stash_free = self.zero_stash and not self._check and not self.last  # the next stage returns them
        with self._autocast():
            if self.first:
                x, initial = model.forward_stem(images), None
            else:
                box_in = _Box()
                tapped_in = _GradTap.apply(box_in, self.anchor, *received.pop(Transfer("act", m)))
                x, initial = tapped_in[0], list(tapped_in[1:])
                del tapped_in
            engine = {}
            if model.reversible:
                policy = model.policy
                if not self.last or self.zero_stash:  # a segment's outputs/inputs are exchanged
                    policy = dataclasses.replace(policy, plain_columns=0)
                seg = Segment()
                engine = dict(policy=policy, keep_outputs=not stash_free, segment=seg)
            taps = [model.config.head_columns[h] for h in self.heads if h != self.final_head]
            state, tapped = model.forward_columns(x, a, b, initial=initial, taps=taps, **engine)
            del initial
            loss = None
            if self.heads:  # the loss terms of the heads this stage holds, by everyone's loss function
                loss, parts = loss_fn(model.forward_heads(state, tapped, images.shape[-2:], self.heads), targets, images)
        if loss is not None:
            loss = loss / self.M
            values = [loss.detach()] + [parts.get(k, loss.new_zeros(())) / self.M for k in self.part_names]
            self._parts += torch.stack([v.double() for v in values])  # no host sync per micro-batch
        sent: List[tuple] = []
        if not self.last:
            outs = [x] + list(state)
            box_out = _Box()
            sink = _GradSink.apply(box_out, *outs)
            sent = [(o.shape, o.dtype) for o in outs]
            self._outbox[Transfer("act", m)] = [o.detach() for o in outs]
        del state, x
        self._inflight[m] = _InFlight(loss, sink, box_in, box_out, seg, sent)

    def _backward(self, m: int, received) -> None:
        fl = self._inflight.pop(m)
        if self.zero is not None and m == self.M - 1:
            self.zero.arm()  # the last backward: each run of gradients is reduced as it completes
        roots, grads = [], []
        if fl.loss is not None:
            roots.append(fl.loss)
            grads.append(torch.ones_like(fl.loss))
        if not self.last:
            returned = self.zero_stash or self._check  # our outputs come back reconstructed
            g = received.pop(Transfer("grad", m))
            if returned:
                fl.segment.provide_outputs(g[5:])
                g = g[:5]
            fl.box_out.grads = g
            roots.append(fl.sink)
            grads.append(torch.zeros_like(fl.sink))
            del g
        torch.autograd.backward(roots, grads)
        del roots, grads
        if fl.segment is not None and fl.segment.st is not None and fl.segment.st.drift is not None:
            self._drift = torch.maximum(self._drift, fl.segment.st.drift.double())
        if not self.first:
            out = list(fl.box_in.grads)
            if self.zero_stash or self._check:
                out += [r.detach() for r in fl.segment.reconstructed_inputs()]
            self._outbox[Transfer("grad", m)] = out

    # ---- communication -----------------------------------------------------------------

    def _key(self, images: torch.Tensor, mode: str) -> tuple:
        """What decides the activations' shapes and dtypes; every stage holds the same images."""
        return (mode, tuple(images.shape), self.precision)

    def _transfer(self, slot, micro_batches) -> Dict[Transfer, List[torch.Tensor]]:
        """One slot's traffic as one batch: the previous action's outputs out, this action's
        inputs in (see ``p2p_slots``). Returns the received tensors by transfer."""
        sends, recvs, received = [], [], {}
        for t in slot.sends:
            out = self._outbox.pop(t)
            if t.kind == "act":
                sends += [(x, self.next_rank) for x in self._with_header(self._key(micro_batches[t.micro][0], "train"), out)]
            else:
                sends += [(x, self.prev_rank) for x in out]
        for t in slot.recvs:
            if t.kind == "act":
                specs, src = self._activation_specs(self._key(micro_batches[t.micro][0], "train")), self.prev_rank
            else:
                sent = self._inflight[t.micro].sent
                returned = self.zero_stash or self._check  # the gradients, then our outputs reconstructed
                specs, src = sent + (sent[1:] if returned else []), self.next_rank
            received[t] = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in specs]
            recvs += [(buf, src) for buf in received[t]]
        if sends or recvs:
            with self._wait.measure():
                comm.exchange(sends, recvs).wait()
        return received

    def _with_header(self, key: tuple, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
        """The activations, after a header of their shapes the first time this key is sent."""
        if key in self._specs_sent:
            return tensors
        h = [0] * (len(tensors) * _HEADER)
        for i, t in enumerate(tensors):
            h[i * _HEADER: i * _HEADER + 2 + t.ndim] = [_DTYPES.index(t.dtype), t.ndim, *t.shape]
        self._specs_sent[key] = [(t.shape, t.dtype) for t in tensors]
        return [torch.tensor(h, dtype=torch.int64, device=self.device)] + tensors

    def _activation_specs(self, key: tuple) -> list:
        """Cached; the first time, the header is received on its own first (one host sync per
        shape of the run, not per micro-batch)."""
        if key not in self._specs_received:
            header = torch.empty(5 * _HEADER, dtype=torch.int64, device=self.device)
            with self._wait.measure():
                comm.exchange(recvs=[(header, self.prev_rank)]).wait()
            h, specs = header.tolist(), []
            for i in range(5):
                dtype, ndim = _DTYPES[h[i * _HEADER]], h[i * _HEADER + 1]
                specs.append((tuple(h[i * _HEADER + 2: i * _HEADER + 2 + ndim]), dtype))
            self._specs_received[key] = specs
        return self._specs_received[key]

    def _recv_activations(self, key: tuple) -> List[torch.Tensor]:
        bufs = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self._activation_specs(key)]
        with self._wait.measure():
            comm.exchange(recvs=[(b, self.prev_rank) for b in bufs]).wait()
        return bufs

    def _average_gradients(self) -> None:
        if self.zero is not None:
            self.zero.reduce()
            return
        if self.D == 1:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = comm.all_reduce_(torch.cat([g.reshape(-1) for g in grads]), group=self.dp_group)
        flat /= self.D
        for g, avg in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(avg.view_as(g))
