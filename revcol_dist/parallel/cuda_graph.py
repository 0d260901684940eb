"""A step's forward and backward replayed as one CUDA graph (``train.cuda_graph``).

A RevCol step is thousands of kernels; a small model at a small batch (RevCol-T at 64) is
bound by the host launching them, not by the GPU running them. After ``warmup`` eager steps
(cuDNN's and Triton's tuning, the compiled graphs, the optimizer's state and the allocator
settle), the forward, loss, backward and replica mean are captured; every later step copies
its batch into the captured input buffers and replays them: one launch. (Captured again where
the reversible engine's choice of level inputs to keep changes: ``MinimaWatch``.) The optimizer
step stays eager (a few dozen multi-tensor kernels; the learning rate stays a host float).

What a graph needs of the step, and where it holds (checked on a CPU in
tests/parallel/test_cuda_graph.py): the same kernels with the same host arguments every step
(the step index reaches the random draws as a device tensor, ``randomness.Step``); no host read
of the step's values (``Trainer.settle``); gradients written, not accumulated, into buffers
the graph owns, which stay on the parameters between steps (``Backend.clear_grads`` off).
One process only: DDP, DeepSpeed and the pipeline run collectives and hooks of their own.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..randomness import SampleKeys
from ..reversible.function import AlphaMinima, captured_alpha_minima, restore_alpha_minima
from ..reversible.host_copy import HostCopy
from .backends import Backend, LossFn, MicroBatch, StepLoss

GRAPH_WARMUP = 3  # eager steps before the capture (cuDNN's and Triton's tuning happen in the first)


class CudaGraph:
    """torch.cuda.CUDAGraph, captured on its own stream (on which the warm-up also ran: cuBLAS
    and cuDNN set up per stream), in thread-local error mode (the data loader's threads may
    pin memory meanwhile)."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self.graph = torch.cuda.CUDAGraph()

    def run_beside(self, body: Callable):
        """``body`` eagerly on the capture stream, ordered after and before the current stream's work."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = body()
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def capture(self, body: Callable):
        """A fresh capture of ``body``. Everything it compiles was compiled in the warm-up: a
        recompilation (which reads the generator state, illegal in a capture) fails naming
        the guard that changed."""
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.compiler.set_stance("fail_on_recompile"), \
                torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
            out = body()
        return out

    def replay(self) -> None:
        self.graph.replay()

    def release(self) -> None:
        """Let the graph and its memory pool go (before an eager step and a new capture)."""
        self.graph.reset()


class MinimaWatch:
    """The captured forward's alpha minima (``reversible.function.AlphaMinima``, on the device),
    sent to the host after each replay into one of two pinned slots, and read from the older
    slot: that replay's step has been settled by the Trainer before the next step's call, so
    the read never waits. ``changed()``: they imply other keep decisions than the capture made."""

    def __init__(self, minima: Sequence[AlphaMinima]) -> None:
        self.minima = [m for m in minima if m.device is not None]
        self.slots = [[torch.empty(m.device.shape, dtype=m.device.dtype, pin_memory=m.device.is_cuda)
                       for m in self.minima] for _ in range(2)]
        self.copies: List[Optional[List[HostCopy]]] = [None, None]  # what was sent into each slot
        self.sent = 0

    def send(self) -> None:
        k = self.sent % 2
        self.copies[k] = [HostCopy(m.device, into=slot) for slot, m in zip(self.slots[k], self.minima)]
        self.sent += 1

    def changed(self) -> bool:
        older = self.copies[self.sent % 2]
        if not older or not all(c.ready() for c in older):
            return False
        return any(m.implied(c.tolist()) != m.used for c, m in zip(older, self.minima))


def _signature(micro_batches: Sequence[MicroBatch]) -> Tuple:
    """What a captured graph is specific to: each input's shape, strides, dtype and device."""
    def of(t: torch.Tensor):
        return tuple(t.shape), t.stride(), t.dtype, t.device

    return tuple((of(x), of(y), of(k.ids)) + ((k.seed, k.streams, k.keeps),) for x, y, k in micro_batches)


class GraphedForwardBackward:
    """Stands in for ``backend.forward_backward``: eager for ``warmup`` steps (the last on the
    input buffers the graph will read), then captured and replayed. A batch of another shape
    (a smaller last batch) runs eagerly beside the graph."""

    def __init__(self, backend: Backend, warmup: int = GRAPH_WARMUP, new_graph: Optional[Callable] = None) -> None:
        if warmup < 1:
            raise ValueError("train.cuda_graph needs at least one eager step before the capture")
        self.backend = backend
        self.eager = backend.forward_backward
        self.warmup = warmup
        self.graph = (new_graph or CudaGraph)(next(backend.model.parameters()).device)
        self.steps = 0
        self.inputs: Optional[List[MicroBatch]] = None  # the buffers the graph reads
        self.signature: Optional[Tuple] = None  # theirs (``_signature``), what a batch must match
        self.step_index: Optional[torch.Tensor] = None  # the keys' step, on the device
        self.output: Optional[StepLoss] = None  # the buffers the graph writes
        self.grads: Optional[List[Tuple[torch.nn.Parameter, torch.Tensor]]] = None
        self.loss_fn: Optional[LossFn] = None
        self.left: Optional[tuple] = None  # what the captured forward left for later readers (``_back_to_graph``)
        self.displaced = False  # a step ran beside the graph: its gradients and readers are the eager step's
        self.watch = MinimaWatch([])
        self.replays = self.beside = self.captures = 0

    @property
    def captured(self) -> bool:
        return self.grads is not None

    def __call__(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn) -> StepLoss:
        self.steps += 1
        if self.inputs is not None and (loss_fn is not self.loss_fn
                                        or _signature(micro_batches) != self.signature):
            return self._eager_beside(micro_batches, loss_fn)
        if self.captured and self.watch.changed():
            self._release()  # the captured forward keeps or reconstructs other level inputs: capture anew
        if self.inputs is None and self.steps < self.warmup:
            return self.graph.run_beside(lambda: self.eager(micro_batches, loss_fn))
        if self.inputs is None:  # the last warm-up: the graph's own buffers, eagerly
            self._make_inputs(micro_batches)
            self.loss_fn = loss_fn
            return self.graph.run_beside(lambda: self.eager(self.inputs, loss_fn))
        self._fill(micro_batches)
        if not self.captured:
            self._capture()
        elif self.displaced:
            self._back_to_graph()
        self.graph.replay()
        self.watch.send()
        self.replays += 1
        return _copied(self.output)

    def _make_inputs(self, micro_batches: Sequence[MicroBatch]) -> None:
        """Clones of this batch, with keys whose step is a device tensor. Keys are required:
        without them drop path would draw from torch's generator, whose state the reversible
        engine copies to the host for its recomputation."""
        if not all(len(m) > 2 and isinstance(m[2], SampleKeys) for m in micro_batches):
            raise ValueError("train.cuda_graph needs keyed micro-batches (images, targets, SampleKeys), as the "
                             "Trainer makes them")
        self.step_index = torch.zeros((), dtype=torch.int64, device=micro_batches[0][2].ids.device)
        self.inputs = [(x.clone(), y.clone(), SampleKeys(k.seed, self.step_index, k.ids.clone(), k.streams, k.keeps))
                       for x, y, k in micro_batches]
        self.signature = _signature(self.inputs)
        self._fill(micro_batches)

    def _fill(self, micro_batches: Sequence[MicroBatch]) -> None:
        """This step's batch into the graph's input buffers (device copies, no host wait)."""
        for (x, y, k), (sx, sy, sk) in zip(micro_batches, self.inputs):
            sx.copy_(x, non_blocking=True)
            sy.copy_(y, non_blocking=True)
            sk.ids.copy_(k.ids, non_blocking=True)
            sk.forget()  # the capture must record the draws, not reuse an eager run's
        self.step_index.fill_(micro_batches[0][2].step)

    def _capture(self) -> None:
        """Gradients start unset, so the graph writes them (not adds to them); afterwards they
        stay on the parameters, overwritten by each replay."""
        params = self.backend.trainable()
        for p in params:
            p.grad = None
        self.output = self.graph.capture(lambda: self.eager(self.inputs, self.loss_fn))
        self.grads = [(p, p.grad) for p in params if p.grad is not None]
        self.backend.clear_grads = False
        model = self.backend.model
        drift = getattr(model, "drift", None)
        checks = None if drift is None else (drift._last, drift.boundaries_checked)
        self.left = (captured_alpha_minima(model), self.backend.last_loss, checks)
        self.watch = MinimaWatch(self.left[0])
        self.captures += 1

    def _release(self) -> None:
        """Back to the last warm-up: this step eagerly on fresh input buffers, the next captured."""
        for p, _ in self.grads:
            p.grad = None
        self.grads, self.inputs, self.output, self.left = None, None, None, None
        self.watch = MinimaWatch([])
        self.graph.release()
        self.backend.clear_grads, self.displaced = True, False
        self.steps = self.warmup

    def _back_to_graph(self) -> None:
        """After an eager step beside the graph: the graph's gradients on the parameters again,
        and what the captured forward left for later readers (its alpha minima, its loss for
        the finite check, its drift checks) in place of the eager step's."""
        for p, g in self.grads:
            p.grad = g
        minima, loss, checks = self.left
        restore_alpha_minima(self.backend.model, minima)
        self.backend.last_loss = loss
        if checks is not None:
            self.backend.model.drift.record(*checks)
        self.displaced = False

    def _eager_beside(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn) -> StepLoss:
        """Eagerly, into gradients of its own (the graph's buffers stay as they are)."""
        if self.captured:
            for p, _ in self.grads:
                p.grad = None
            self.displaced = True
        self.beside += 1
        return self.graph.run_beside(lambda: self.eager(micro_batches, loss_fn))


def _copied(out: StepLoss) -> StepLoss:
    """The graph's outputs, copied (the next replay overwrites them before the Trainer reads
    them a step late): one kernel."""
    names = sorted(out.parts)
    values = torch.stack([out.loss] + [out.parts[k] for k in names])
    return StepLoss(values[0], dict(zip(names, values[1:])))


def graph_forward_backward(backend: Backend, warmup: int = GRAPH_WARMUP,
                           new_graph: Optional[Callable] = None) -> GraphedForwardBackward:
    """Replace ``backend``'s forward_backward by its captured replay (``GraphedForwardBackward``);
    the one-process backend only."""
    if backend.name != "single":
        raise ValueError(f"train.cuda_graph runs one process; the {backend.name} backend launches collectives "
                         f"and hooks of its own: set train.cuda_graph=false")
    policy = getattr(backend.model, "policy", None)
    if getattr(policy, "offload_boundaries", False):
        raise ValueError("train.cuda_graph with offloaded boundaries (a side stream and host buffers): "
                         "set one of them off")
    graphed = GraphedForwardBackward(backend, warmup, new_graph)
    backend.forward_backward = graphed
    return graphed
