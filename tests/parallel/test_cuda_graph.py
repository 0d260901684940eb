"""``train.cuda_graph`` on a CPU: what a captured forward and backward needs of the step, and
the wrapper's bookkeeping, with a stand-in for the CUDA graph that does what one does with
memory (a replay recomputes into the captured output and gradient buffers from the captured
input buffers). The graph itself runs on a GPU only (benchmarks/gpu_check.py, gpu_step.py)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from revcol_dist.engine.losses import RevColLoss
from revcol_dist.engine.optim import make_optimizer
from revcol_dist.models import create_model
from revcol_dist.models.layers import random_streams, stream_keeps
from revcol_dist.parallel.backends import LocalBackend
from revcol_dist.parallel.cuda_graph import graph_forward_backward
from revcol_dist.parallel.distributed import DistInfo
from revcol_dist.randomness import SampleKeys

LOSS = RevColLoss((0.5,) * 3, (0.25,) * 3)
SMALL = dict(channels=(16, 24, 32, 40), layers=(1, 1, 2, 1), num_classes=7, drop_path=0.3, inter_supv=True)


class Trace(TorchDispatchMode):
    """Each op with its host arguments (tensors by shape and dtype only): what a graph bakes in."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        host = tree_map(lambda a: (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a, (args, kwargs))
        self.ops.append((str(func), repr(host)))
        return func(*args, **(kwargs or {}))


class StandInGraph:
    """A CUDA graph's memory semantics on a CPU: ``capture`` runs the body once and keeps its
    outputs and the gradients it leaves; ``replay`` runs the body again from the same input
    buffers and writes the results into those same tensors. ``trace``: each run's ops."""

    def __init__(self, device, trace=False):
        self.body, self.out, self.traces, self.trace = None, None, [], trace

    def run_beside(self, body):
        return body()

    def release(self):
        self.body = self.out = None

    def capture(self, body):
        self.body = body
        self.out = self._run()
        self.reads = self._buffers()
        return self.out

    def _buffers(self):
        """The input buffers a graph's kernels read (their addresses are baked in)."""
        return [(t, t.data_ptr()) for x, y, k in self.wrapper.inputs for t in (x, y, k.ids, k.step)]

    def replay(self):
        # the wrapper filled the captured buffers in place, never rebinding them
        assert [(id(t), p) for t, p in self._buffers()] == [(id(t), p) for t, p in self.reads]
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        backend = self.wrapper.backend
        untouched = backend.last_loss, backend.model.drift._last  # a graph's replay runs no Python
        new = self._run()
        backend.last_loss, backend.model.drift._last = untouched
        for p, g in zip(params, grads):
            g.copy_(p.grad)
            p.grad = g
        self.out.loss.copy_(new.loss)
        for k, v in new.parts.items():
            self.out.parts[k].copy_(v)

    def _run(self):
        for _, _, keys in self.wrapper.inputs:  # a graph replays the draws' kernels: run them, not a cache
            keys.forget()
        if not self.trace:
            return self.body()
        with Trace() as t:
            out = self.body()
        self.traces.append(t.ops)
        return out


def _setup(batches=8, n=4, res=32, trace=False, micro=1, sizes=None):
    torch.manual_seed(0)
    model = create_model("revcol_tiny", **SMALL)
    streams = random_streams(model)
    keeps = stream_keeps(model, streams)
    g = torch.Generator().manual_seed(1)
    data = []
    for i, size in enumerate(sizes or [n] * batches):
        x, y = torch.randn(size, 3, res, res, generator=g), torch.randint(0, 7, (size,), generator=g)
        keys = SampleKeys(5, i, torch.arange(i * n, i * n + size), streams, keeps)
        data.append(list(zip(x.tensor_split(micro), y.tensor_split(micro), keys.split(micro))))
    return model, data


def _run(model, data, graphed: bool, trace=False, warmup=2):
    model = create_model("revcol_tiny", **SMALL) if model is None else model
    backend = LocalBackend(model, DistInfo(0, 1, 0), lambda m: make_optimizer(m, "adamw", 0.05, 0.9),
                           torch.device("cpu"), "bf16", clip_grad=1.0)
    graph = None
    if graphed:
        graph = StandInGraph(None, trace)
        graph.params = backend.trainable()
        wrapper = graph.wrapper = graph_forward_backward(backend, warmup, new_graph=lambda device: graph)
    losses, kept = [], []
    for i, micro in enumerate(data):
        out = backend.forward_backward(micro, LOSS)
        kept.append(out)
        backend.step(lr=1e-3 * (i + 1))  # a learning rate of its own every step
    losses = [(float(o.loss), {k: float(v) for k, v in o.parts.items()}) for o in kept]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, graph, (wrapper if graphed else None)


@pytest.mark.parametrize("micro", [1, 2])
def test_replays_train_as_the_eager_step_does(micro):
    """Two eager warm-up steps, the capture, replays, and a smaller batch beside the graph
    (then replays again): every step's loss and terms, and the weights at the end, bitwise
    those of the eager steps; each step's returned loss survives the replays after it."""
    sizes = [4, 4, 4, 4, 2, 4, 4]
    model, data = _setup(sizes=sizes, micro=micro)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager_losses, eager_weights, _, _ = _run(model, data, graphed=False)
    model.load_state_dict(state)
    graph_losses, graph_weights, graph, wrapper = _run(model, data, graphed=True)
    assert wrapper.captured and wrapper.replays == 4 and wrapper.beside == 1
    assert graph_losses == eager_losses
    assert all(torch.equal(graph_weights[n], w) for n, w in eager_weights.items())
    # between steps the gradients are the graph's buffers (what its kernels write), and the
    # finite check reads the captured loss again after the step beside it
    assert all(p.grad is g for p, g in wrapper.grads)
    assert wrapper.backend.last_loss is wrapper.output.loss


def test_every_replay_runs_the_captured_ops_with_the_same_host_arguments():
    """What a CUDA graph requires: the step's ops and their host arguments (scalars, shapes)
    are the same whatever the step index, the batch and the learning rate; the step reaches
    drop path's draws as a device tensor. With the step as a host int (as eager steps key
    their draws) the traces differ: the check can fail."""
    model, data = _setup(batches=6)
    _, _, graph, _ = _run(model, data, graphed=True, trace=True)
    assert len(graph.traces) == 5  # the capture and four replays
    assert all(t == graph.traces[0] for t in graph.traces[1:])
    assert len(graph.traces[0]) > 500
    # the same body, keyed by host ints: step 3 and step 4 differ in their arguments
    backend = LocalBackend(create_model("revcol_tiny", **SMALL), DistInfo(0, 1, 0),
                           lambda m: make_optimizer(m, "adamw", 0.05, 0.9), torch.device("cpu"), "bf16")
    traces = []
    for micro in data[3:5]:
        with Trace() as t:
            backend.forward_backward(micro, LOSS)
        traces.append(t.ops)
    assert traces[0] != traces[1]


def test_refuses_what_it_cannot_capture():
    model = create_model("revcol_tiny", **SMALL)
    backend = LocalBackend(model, DistInfo(0, 1, 0), lambda m: make_optimizer(m, "adamw", 0.05, 0.9),
                           torch.device("cpu"))
    backend.name = "ddp"
    with pytest.raises(ValueError, match="train.cuda_graph runs one process"):
        graph_forward_backward(backend, new_graph=lambda d: StandInGraph(d))
    backend.name = "single"
    wrapper = graph_forward_backward(backend, warmup=1, new_graph=lambda d: StandInGraph(d))
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 7, (2,))
    with pytest.raises(ValueError, match="keyed micro-batches"):
        wrapper([(x, y)], LOSS)


def test_the_switch_is_a_one_line_error_where_it_cannot_run(tmp_path):
    from revcol_dist.config import ConfigError, load_config, validate_layout
    from revcol_dist.engine.train import Trainer

    cfg = load_config(None, [f"output_dir={tmp_path}", f"data.root={tmp_path}/digits", "train.cuda_graph=true"])
    with pytest.raises(ConfigError, match="this launch is DDP or the pipeline on 2 ranks.*set train.cuda_graph=false"):
        validate_layout(cfg, 2)
    with pytest.raises(ConfigError, match="needs a CUDA device; this run is on cpu"):
        Trainer(cfg, log=lambda *_: None)


def test_new_alpha_decisions_capture_anew(monkeypatch):
    """When the alpha minima a replay sent to the host imply other keep decisions than the
    captured forward made, the graph is let go: that step runs eagerly on fresh buffers, the
    next is captured anew; the training is still bitwise the eager steps'."""
    from revcol_dist.parallel import cuda_graph

    answers = iter([False, True, False, False])  # asked before the replays of steps 4, 5, 7 and 8
    monkeypatch.setattr(cuda_graph.MinimaWatch, "changed", lambda self: next(answers))
    model, data = _setup(batches=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager_losses, eager_weights, _, _ = _run(model, data, graphed=False)
    model.load_state_dict(state)
    losses, weights, _, wrapper = _run(model, data, graphed=True)
    assert (wrapper.captures, wrapper.replays) == (2, 5) and next(answers, None) is None
    assert losses == eager_losses and all(torch.equal(weights[n], w) for n, w in eager_weights.items())


def test_the_minima_imply_decisions_with_the_lag_margin():
    """What the watch compares: the decisions the minima imply (threshold x 1.5, for the step
    they lag) against those the captured forward made; restored after an eager forward."""
    from revcol_dist.reversible.function import AlphaMinima, captured_alpha_minima, restore_alpha_minima

    model = create_model("revcol_tiny", **SMALL)
    assert captured_alpha_minima(model) == []  # no forward on a GPU yet (a CPU decides exactly, sends nothing)
    minima = AlphaMinima([False, False], 0.1, device=torch.tensor([0.5, 0.12]))
    assert minima.implied([0.5, 0.12]) == [False, True] and minima.implied([0.16, 0.2]) == [False, False]
    object.__setattr__(model.columns[0], "_revcol_alpha_mins", minima)
    assert captured_alpha_minima(model) == [minima] and minima.read() == pytest.approx([0.5, 0.12])
    other = AlphaMinima([True, True], 0.1, device=torch.tensor([0.0, 0.0]))
    object.__setattr__(model.columns[0], "_revcol_alpha_mins", other)
    restore_alpha_minima(model, [minima])
    assert captured_alpha_minima(model) == [minima]


def test_the_watch_reads_the_older_of_its_two_slots():
    """Each replay's minima go to the other slot; ``changed`` reads the slot a replay older than
    the last (finished by the time the Trainer calls again), so a change is seen one replay
    after it was sent, and only where the decisions it implies differ from the captured ones."""
    from revcol_dist.parallel.cuda_graph import MinimaWatch
    from revcol_dist.reversible.function import AlphaMinima

    captured = AlphaMinima([False, False, True], 0.1, device=torch.tensor([0.5, 0.5, 0.05]))
    watch = MinimaWatch([captured, AlphaMinima([False], 0.1)])  # an eager forward's (no device minima): ignored
    assert len(watch.minima) == 1
    seen = []
    for values in ([0.5, 0.5, 0.05], [0.5, 0.12, 0.05], [0.5, 0.5, 0.05], [0.5, 0.5, 0.05]):
        captured.device.copy_(torch.tensor(values))  # what this replay computed
        seen.append(watch.changed())  # asked before the replay
        watch.send()
    seen.append(watch.changed())
    # 0.12 is below 0.1 x 1.5: keep that level's input. Sent by the second replay, seen before the fourth
    assert seen == [False, False, False, True, False]
    assert not MinimaWatch([]).changed()
