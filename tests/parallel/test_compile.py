"""Compiled ConvNeXt blocks (``train.compile``) against eager, on the CPU (inductor's C++ backend):
gradients within the precision's rounding, the reversible recomputation bitwise the forward
(exact reconstruction), and the switch as the Trainer applies it."""

import dataclasses
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from revcol_dist.config import ConfigError, load_config
from revcol_dist.models import create_model
from revcol_dist.models.column import Fusion
from revcol_dist.models.heads import Decoder
from revcol_dist.parallel.compile import apply_compile, wants_compile
from revcol_dist.reversible import coupling, function, fusion_kernels, lean_block

# compiles ~a dozen graphs, shared by the tests of this module (suite.py keeps a module on one worker)
pytestmark = pytest.mark.slow

SMALL = dict(channels=(16, 24, 32, 40), layers=(1, 1, 2, 1), num_classes=7, drop_path=0.2)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("revcol_tiny", **SMALL).train()
    yield m
    apply_compile(m, False, CPU)  # the process's blocks back to eager for the tests after these


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 64, 64, generator=g), torch.tensor([1, 4])


def step(model, batch, compiled, reversible: bool, autocast: bool = False):
    """(loss, {name: grad}) of one forward/backward with the same drop-path draws (compiled
    None: the kernels as they are set)."""
    if compiled is not None:
        apply_compile(model, compiled, CPU)
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    x, labels = batch
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = model(x)
        loss = F.cross_entropy(out.logits.float(), labels)
        loss = loss + sum(F.cross_entropy(a.float(), labels) for a in out.aux_logits)
        loss = loss + sum(r.float().square().mean() for r in out.reconstructions)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def worst(ga, gb) -> float:
    """Largest per-parameter relative error (norm of the difference / norm of the reference)."""
    assert ga.keys() == gb.keys()
    return max(((ga[n] - gb[n]).norm() / ga[n].norm().clamp_min(1e-30)).item() for n in ga)


def test_compiled_blocks_match_eager_in_fp32(model, batch):
    eager_rev, eager_plain = step(model, batch, False, True), step(model, batch, False, False)
    comp_rev, comp_plain = step(model, batch, True, True), step(model, batch, True, False)
    assert lean_block.kernels_in_use()
    for eager, comp in ((eager_rev, comp_rev), (eager_plain, comp_plain)):
        assert abs(eager[0] - comp[0]) <= 1e-6 * abs(eager[0])
        assert worst(eager[1], comp[1]) < 1e-5
    # compiled at all: the generated kernels round differently from eager's
    assert worst(eager_rev[1], comp_rev[1]) > 0.0
    # the bar for the compiled path: fp32 reversible against plain within 1e-5
    assert worst(comp_plain[1], comp_rev[1]) < 1e-5


def test_compiled_blocks_under_bf16_autocast_round_no_worse_than_eager(model, batch):
    reference = step(model, batch, False, True)[1]  # fp32, eager
    eager = step(model, batch, False, True, autocast=True)[1]
    comp = step(model, batch, True, True, autocast=True)[1]
    comp_plain = step(model, batch, True, False, autocast=True)[1]
    eager_err = worst(reference, eager)
    assert 0.0 < eager_err < 0.1  # bf16 rounds, and not grossly
    assert worst(reference, comp) <= 2 * eager_err
    assert worst(reference, comp_plain) <= 2 * eager_err


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_forward_and_recomputation_run_the_same_compiled_graph(model, batch, monkeypatch, autocast):
    """Each level output the backward recomputes to invert the coupling is the output of the
    compiled block kernel (and each level's fusion the compiled fusion's), and the forward
    computed the same value bit for bit: the forward's last block of a level computes the
    coupling alpha * prev + f in its graph's last pass, so its f is checked through that graph
    with alpha = 1 and prev = 0 (exactly f); and its coupling is alpha * prev + f to rounding.
    (On a CPU eager and generated kernels often agree bitwise, so equality alone would not show
    that the kernels ran.) Every boundary is kept here, so each recomputation starts from the
    forward's own inputs (between kept boundaries the inputs are reconstructions, which differ
    by the inverse's rounding)."""
    monkeypatch.setattr(model, "policy", dataclasses.replace(model.policy, boundary_interval=1))
    apply_compile(model, True, CPU)
    compiled = lean_block.use_kernels(None)
    latest = {}
    guards = {}  # per call's shapes, dtypes and strides: the requires_grad flags it came with
    coupled = []  # (arguments, the forward's coupled output) of each call that coupled

    def forward_full(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        guards.setdefault(tuple((t.shape, t.dtype, t.stride()) for t in tensors), set()).add(
            tuple(t.requires_grad for t in tensors))
        out = compiled.forward_full(*args)
        latest["ptr"] = out[0].data_ptr()
        if len(args) > 13:
            coupled.append((args, out[0].detach().clone()))
        return out

    fusion_out = []

    def fusion(*args):
        out = compiled.fusion(*args)
        fusion_out.append(out.detach().clone())
        return out

    recomputed_f = []

    def recording_invert(alpha, out, f, *rest):  # the shortcut node's compiled backward
        recomputed_f.append((f.detach().clone(), f.data_ptr() == latest.get("ptr")))
        return compiled.shortcut(alpha, out, f, *rest)

    lean_block.use_kernels(compiled._replace(forward_full=forward_full, fusion=fusion, shortcut=recording_invert))
    step(model, batch, None, True, autocast=autocast)
    lean_block.use_kernels(compiled)
    # columns 1-2 of the three reversible ones (column 0 has nothing to invert) x levels 0-2
    # (RevCol-T keeps level 3 with ordinary autograd): each coupled in the forward's last block
    assert len(recomputed_f) == len(coupled) == 6
    assert all(from_kernel for _, from_kernel in recomputed_f)
    # one compiled graph per shape: the forward and the recomputation call it with the same
    # requires_grad flags, which torch.compile guards on (two graphs could pick different kernels)
    assert guards and all(len(flags) == 1 for flags in guards.values())
    for args, out in coupled:
        *block_args, alpha, prev = args
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):  # as the forward ran it
            f = compiled.forward_full(*block_args, torch.ones_like(alpha), torch.zeros_like(prev))[0]
        same = [g for g, _ in recomputed_f if g.shape == f.shape and torch.equal(f, g)]
        assert same, "the coupled graph's block output differs from the recomputation's"
        torch.testing.assert_close(out, torch.addcmul(same[0], alpha, prev), rtol=1e-6, atol=1e-6)
    # the fusions too: each of the 9 reversible levels (3 columns x levels 0-2) in the forward
    # and again in the recomputation, through the compiled graph, bit for bit the same twice;
    # the 7 levels under plain autograd (the plain column's 4, the kept level 3 of the others)
    # once, through the same compiled function (the modules' forward points at it)
    assert len(fusion_out) == 25
    twinned = [sum(f.shape == g.shape and torch.equal(f, g) for g in fusion_out) >= 2 for f in fusion_out]
    assert sum(twinned) == 18


@pytest.mark.parametrize("change", [dict(lean_blocks=False), dict(recompute="block")], ids=["autograd_blocks", "block_mode"])
def test_other_recomputation_modes_compiled(model, batch, monkeypatch, change):
    """Blocks by autograd, and the memory-first block mode: compiled gradients within 1e-5 of
    eager (fp32), and each fusion the forward computed is computed again, bit for bit, by the
    recomputation (the same compiled graph: with autograd in the first mode, without in the
    second)."""
    monkeypatch.setattr(model, "policy", dataclasses.replace(model.policy, boundary_interval=1, **change))
    eager = step(model, batch, False, True)[1]
    apply_compile(model, True, CPU)
    compiled = lean_block.use_kernels(None)
    outputs = []

    def fusion(*args):
        out = compiled.fusion(*args)
        outputs.append((torch.is_grad_enabled(), out.detach().clone()))
        return out

    lean_block.use_kernels(compiled._replace(fusion=fusion))
    comp = step(model, batch, None, True)[1]
    assert worst(eager, comp) < 1e-5
    # 9 reversible levels, in the forward and the recomputation (block mode: a third time, with
    # autograd, for the gradients only: a different graph, so not compared)
    twins = [f for grad, f in outputs if grad == (change.get("recompute") != "block")]
    twinned = [sum(f.shape == g.shape and torch.equal(f, g) for g in twins) >= 2 for f in twins]
    assert sum(twinned) == 18  # (plus, with autograd, the 7 plain levels' fusions, once each)


@pytest.mark.parametrize("reversible", [True, False], ids=["reversible", "plain"])
def test_weights_cast_once_per_step(model, batch, monkeypatch, reversible):
    """Under bf16 autocast the compiled block kernels get their conv and matmul weights already
    in bf16, from one buffer cast once per step (not a cast inside every graph call: forward,
    recomputation and backward), in the reversible engine (its kept levels and plain column
    too) and in a plain forward; the gradients are those of casting inside the graphs."""
    apply_compile(model, True, CPU)
    compiled = lean_block.use_kernels(None)
    seen = []

    def record(i, fn):
        def run(*args):
            seen.append(args[i])  # pwconv1.weight as the graph receives it
            return fn(*args)
        return run

    lean_block.use_kernels(compiled._replace(forward_full=record(5, compiled.forward_full),
                                             body_grads=record(12, compiled.body_grads),
                                             block_grads=record(14, compiled.block_grads)))
    cast_once = step(model, batch, None, reversible, autocast=True)
    assert seen and all(w.dtype == torch.bfloat16 for w in seen)
    assert len({w.untyped_storage().data_ptr() for w in seen}) == 1  # views of one buffer
    blocks = sum(1 for n, _ in model.named_parameters() if n.startswith("columns.") and n.endswith("pwconv1.weight"))
    assert len({w.data_ptr() for w in seen}) == blocks  # each block's one tensor, whatever reads it
    monkeypatch.setattr(lean_block, "cast_weights", lambda *a: None)
    monkeypatch.setattr(lean_block, "weight_casts", lambda cache, _w=lean_block.weight_casts: _w(None))
    seen.clear()
    in_graph = step(model, batch, None, reversible, autocast=True)
    assert seen and all(w.dtype == torch.float32 for w in seen)
    assert abs(cast_once[0] - in_graph[0]) <= 1e-6 * abs(in_graph[0])
    assert worst(in_graph[1], cast_once[1]) < 1e-5


@pytest.mark.parametrize("reversible", [True, False], ids=["reversible", "plain"])
def test_fusion_and_decoder_weights_cast_once_per_step(batch, monkeypatch, reversible):
    """Under bf16 autocast the compiled fusions (the reversible engine's levels; every fusion of
    a plain forward) and the decoders' stages and outputs get their conv and matmul weights in
    bf16, one tensor per weight and step whichever call reads it (the forward, the engine's
    recomputation, the decoders' checkpointed recomputations), not a cast inside each call;
    the gradients are those of casting inside the graphs."""
    from revcol_dist.parallel import compile as compile_module
    from revcol_dist.parallel import step_casts

    torch.manual_seed(0)
    m = create_model("revcol_tiny", inter_supv=True, **SMALL).train()
    apply_compile(m, True, CPU)
    compiled = lean_block.use_kernels(None)
    stage, output = compile_module.compiled_decoder()
    seen = {"fusion": [], "stage": [], "output": []}

    def fusion(*args):
        part = next((p for p in args[3:6] if p is not None), None)  # down, up, up2 (level 0: maybe none)
        if part is not None:
            seen["fusion"].append(part[0])  # the conv's or the Linear's weight
        return compiled.fusion(*args)

    def record(name, i, fn):
        def run(*args):
            seen[name].append(args[i] if name == "output" else args[i][0])
            return fn(*args)
        return run

    lean_block.use_kernels(compiled._replace(fusion=fusion))
    monkeypatch.setattr(compile_module, "compiled_decoder", lambda: (record("stage", 2, stage), record("output", 2, output)))
    try:
        cast_once = step(m, batch, None, reversible, autocast=True)
        fusions = [w for w in seen["fusion"] if w.dtype == torch.bfloat16]
        uses = Counter(w.data_ptr() for w in fusions)
        if reversible:  # the engine's levels (the plain last column and kept levels cast in the graph)
            assert len(uses) >= 2 * len(m.columns) and set(uses.values()) == {2}  # forward, recomputation
        else:
            assert len(fusions) == len(seen["fusion"]) and set(uses.values()) == {1}
            assert len(fusions) == sum(bool(fusion_kernels.cast_targets(mod)) for mod in m.modules()
                                       if isinstance(mod, Fusion))
        decoders = [w for name in ("stage", "output") for w in seen[name]]
        assert decoders and all(w.dtype == torch.bfloat16 for w in decoders)
        n_decoders = sum(isinstance(mod, Decoder) for mod in m.modules())
        assert len({w.untyped_storage().data_ptr() for w in decoders}) == n_decoders  # one cast node each
        assert not any(mod in step_casts._GROUPS for mod in m.modules())  # released once their backward ran
        # one tensor for each weight, whoever reads it: a stage's in the forward, the decoder's
        # recomputation and its own; the output's in the forward and the decoder's recomputation
        # (the stage-wise one stops early: checkpoint's early stop)
        assert set(Counter(w.data_ptr() for w in seen["stage"]).values()) == {3}
        assert set(Counter(w.data_ptr() for w in seen["output"]).values()) == {2}
        monkeypatch.setattr(step_casts, "casts_of", lambda module: {})
        monkeypatch.setattr(function, "_fusion_leaves", lambda st, f: {})
        for v in seen.values():
            v.clear()
        in_graph = step(m, batch, None, reversible, autocast=True)
        assert all(w.dtype == torch.float32 for v in seen.values() for w in v)
        assert abs(cast_once[0] - in_graph[0]) <= 1e-6 * abs(in_graph[0])
        assert worst(in_graph[1], cast_once[1]) < 1e-5
    finally:
        apply_compile(m, False, CPU)


@pytest.mark.parametrize("reversible", [True, False], ids=["reversible", "plain"])
def test_each_block_backward_runs_once_in_one_graph(model, batch, reversible):
    """A block's tail and body gradients come from one compiled call (``block_grads``) in the
    reversible levels and in a plain forward (``memory_policy: plain``); only a reversible step's
    blocks under autograd (its plain column, kept levels) keep two nodes, one call each (their
    two large weight gradients never alive together); every block's backward runs exactly once."""
    apply_compile(model, True, CPU)
    compiled = lean_block.use_kernels(None)
    calls = {"tail_grads": 0, "body_grads": 0, "block_grads": 0}

    def counted(name):
        def run(*args):
            calls[name] += 1
            return getattr(compiled, name)(*args)
        return run

    lean_block.use_kernels(compiled._replace(**{name: counted(name) for name in calls}))
    try:
        step(model, batch, None, reversible, autocast=True)
    finally:
        lean_block.use_kernels(compiled)
    blocks = sum(1 for n, _ in model.named_parameters() if n.startswith("columns.") and n.endswith("pwconv1.weight"))
    assert calls["tail_grads"] == calls["body_grads"] and calls["block_grads"] > 0, calls
    assert calls["block_grads"] + calls["body_grads"] == blocks, (calls, blocks)
    assert (calls["body_grads"] > 0) == reversible, calls  # two nodes: the plain column and kept levels


def test_plain_levels_couple_in_their_last_block(model, batch):
    """Under plain autograd each level with a previous column computes its coupling in its last
    block's compiled forward and takes alpha's and prev's gradients from that block's backward
    graph (no eager coupling left); the gradients are checked against eager in the tests above."""
    apply_compile(model, True, CPU)
    compiled = lean_block.use_kernels(None)
    coupled = Counter()

    def counting(name, fn, n_args):
        def run(*args):
            coupled[name] += len(args) > n_args and args[-1] is not None
            return fn(*args)
        return run

    lean_block.use_kernels(compiled._replace(forward_full=counting("forward", compiled.forward_full, 13),
                                             block_grads=counting("backward", compiled.block_grads, 24)))
    eager_couplings = []
    original = coupling._Coupling.forward
    try:
        coupling._Coupling.forward = staticmethod(lambda ctx, *a: eager_couplings.append(1) or original(ctx, *a))
        step(model, batch, None, False)
    finally:
        coupling._Coupling.forward = staticmethod(original)
        lean_block.use_kernels(compiled)
    levels = 4 * (model.num_columns - 1)  # column 0 has no previous column
    assert coupled["forward"] == coupled["backward"] == levels and not eager_couplings


@pytest.mark.parametrize("kept", [False, True], ids=["reconstructed", "kept"])
def test_shortcut_backward_compiled_matches_eager(kept):
    """The shortcut node's backward as one compiled graph (prev = (c - f) / alpha, the drift
    against a kept prev, prev's and alpha's gradients) gives eager's values within fp32
    rounding, and at a kept map hands back the kept values."""
    from revcol_dist.parallel.compile import compiled_kernels
    from revcol_dist.reversible.coupling import shortcut_backward

    g = torch.Generator().manual_seed(5)
    alpha = torch.rand(1, 24, 1, 1, generator=g) + 0.1
    prev = torch.randn(2, 24, 16, 16, generator=g)
    f = torch.randn(2, 24, 16, 16, generator=g).bfloat16()  # a level's output under autocast
    cur = torch.addcmul(f.float(), alpha, prev)
    grad = torch.randn(2, 24, 16, 16, generator=g)
    held = prev + 1e-4 * torch.randn(prev.shape, generator=g) if kept else None
    # the next column's coupling's part of c's gradient, alpha' * g', added in the same pass
    carried = (torch.rand(1, 24, 1, 1, generator=g) + 0.1, torch.randn(2, 24, 16, 16, generator=g))
    cases = [(grad, None, True, True), (grad, None, False, True), (grad, None, True, False),
             (grad, carried, False, True), (None, carried, False, True)]
    for given, carry, want_prev, want_alpha in cases:
        eager = shortcut_backward(alpha, cur, f, given, held, want_prev, want_alpha, carry)
        comp = compiled_kernels().shortcut(alpha, cur, f, given, held, want_prev, want_alpha, carry)
        for e, c in zip(eager, comp):
            assert (e is None) == (c is None)
            if e is not None:
                assert ((e - c).norm() / e.norm()).item() < 1e-6, (e - c).abs().max()  # fp32 rounding
        assert (eager[1] is None) != want_prev and (eager[2] is None) != want_alpha
        # the gradient of c (and of f) handed back: g, plus alpha' * g' where carried
        total = (0 if given is None else given) + (0 if carry is None else carry[0] * carry[1])
        torch.testing.assert_close(comp[5], total, rtol=1e-6, atol=1e-6)
        if want_alpha:
            torch.testing.assert_close(eager[2], (total * eager[0]).sum(dim=(0, 2, 3), keepdim=True))
        assert torch.equal(comp[0], held) if kept else torch.allclose(comp[0], prev, rtol=1e-4, atol=1e-5)
        if kept:  # the drift: the reconstruction's distance from the kept map, ~1e-4 here
            assert 1e-5 < (comp[3] / comp[4]).item() < 1e-3


def test_decoders_compiled_and_recomputed_through_the_same_graph():
    """Each decoder's stages and output run as compiled functions (pointed at by the module,
    undone by the switch); one decoder's image and gradients match eager within fp32's
    rounding, and checkpointed stage by stage (as a training step runs them) the gradients
    are bitwise those of the uncheckpointed compiled decoder: the recomputation ran the
    forward's graph."""
    from revcol_dist.models.heads import Decoder
    from revcol_dist.models.revcol import _staged_decoder

    torch.manual_seed(0)
    model = create_model("revcol_tiny", inter_supv=True, **SMALL).train()
    apply_compile(model, True, CPU)
    decoders = [m for m in model.modules() if isinstance(m, Decoder)]
    assert decoders and all({"stage", "output"} <= m.__dict__.keys() for m in decoders)
    dec = decoders[0]
    c3 = torch.randn(2, SMALL["channels"][3], 2, 2, generator=torch.Generator().manual_seed(5))
    sizes, image = [(4, 4), (8, 8), (16, 16)], (64, 64)

    def run(fn):
        x = c3.clone().requires_grad_()
        dec.zero_grad(set_to_none=True)
        out = fn(dec, x, sizes, image)
        out.square().mean().backward()
        return out.detach(), [x.grad] + [p.grad.clone() for p in dec.parameters()]

    plain = run(lambda d, *a: d(*a))
    checkpointed = run(_staged_decoder)
    assert torch.equal(plain[0], checkpointed[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], checkpointed[1]))
    apply_compile(model, False, CPU)
    assert not any({"stage", "output"} & m.__dict__.keys() for m in decoders)
    eager = run(_staged_decoder)
    assert (eager[0] - plain[0]).abs().max() <= 1e-5 * eager[0].abs().max()
    assert max(float((a - b).norm() / a.norm()) for a, b in zip(eager[1], plain[1])) < 1e-5


def test_trainer_applies_the_switch(tmp_path):
    """``train.compile`` reaches the model: blocks through the compiled kernels, evaluation's
    too (``block_runner``), and the loss; auto stays eager on a CPU; a wrong value is a one-line error."""
    from revcol_dist.engine.train import Trainer

    base = [f"output_dir={tmp_path}", f"data.root={tmp_path}/digits", "train.max_steps=1"]
    lines = []
    trainer = Trainer(load_config(None, base + ["train.compile=true"]), log=lines.append)
    assert lean_block.kernels_in_use() and trainer.model.block_runner is not None
    assert trainer.loss_fn.terms is not trainer.loss_fn.eager_terms  # the loss compiled too
    assert any(line.startswith("train.compile: ConvNeXt blocks, fusions and decoders run as compiled graphs") for line in lines)
    # train.compile_autotune: the blocks', fusions' and decoders' graphs from the compile with
    # inductor's matmul search (a CPU run offers it cuBLAS's counterpart alone: nothing to time)
    from revcol_dist.parallel import compile as compile_setting

    recorded = {"autotune": [], "combo": []}
    phase = ["autotune"]
    real_compile = torch.compile

    def recording_compile(fn, **kwargs):
        recorded[phase[0]].append((getattr(fn, "__name__", fn), kwargs.get("options")))
        return real_compile(fn, **kwargs)

    saved = dict(compile_setting._COMPILED), dict(compile_setting._DECODER)
    compile_setting._COMPILED.clear()
    compile_setting._DECODER.clear()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "compile", recording_compile)
            Trainer(load_config(None, base + ["train.compile=true", "train.compile_autotune=true"]), log=lines.append)
            compile_setting.compiled_decoder()
            assert lean_block.kernels() is compile_setting.compiled_kernels(True)
            assert compile_setting.compiled_decoder() is compile_setting.compiled_decoder(True)
            # train.compile_combo=true: the same functions compiled with inductor's combo kernels,
            # a cache of their own
            phase[0] = "combo"
            Trainer(load_config(None, base + ["train.compile=true", "train.compile_combo=true"]), log=lines.append)
            compile_setting.compiled_decoder()
            assert compile_setting._CHOICE == (False, True)
            assert lean_block.kernels() is compile_setting.compiled_kernels(False, True)
    finally:
        compile_setting._COMPILED.clear()
        compile_setting._DECODER.clear()
        compile_setting._COMPILED.update(saved[0])
        compile_setting._DECODER.update(saved[1])
        compile_setting._CHOICE = (False, False)
        lean_block.use_kernels(None)
    # every block, fusion and decoder function compiled with the search on, combo kernels off
    # (the default); and with them where asked
    kernels = {"forward_full", "hidden", "tail_grads", "body_grads", "block_grads", "fusion_forward",
               "shortcut_backward", "stage_forward", "output_forward"}
    compiles, combo_compiles = recorded["autotune"], recorded["combo"]
    assert kernels <= {name for name, _ in compiles} and kernels <= {name for name, _ in combo_compiles}
    assert all(options["max_autotune_gemm"] and options["force_layout_optimization"] and "combo_kernels" not in options
               for name, options in compiles if name in kernels)
    assert all(options["combo_kernels"] and options["combo_kernels_pointwise_only"] and "max_autotune_gemm" not in options
               for name, options in combo_compiles if name in kernels)
    assert any("train.compile_combo" in line for line in lines)
    assert any("train.compile_autotune" in line for line in lines)
    assert apply_compile(torch.nn.Module(), "auto", CPU, autotune=True).startswith(
        "train.compile_autotune: ignored, nothing is compiled here")
    trainer = Trainer(load_config(None, base), log=lines.append)  # auto, on a CPU
    assert not lean_block.kernels_in_use() and not wants_compile("auto", CPU)
    assert trainer.loss_fn.terms is trainer.loss_fn.eager_terms
    with pytest.raises(ConfigError, match="train.compile must be auto, true or false, got 'fast'"):
        load_config(None, base + ["train.compile=fast"])


def test_autotuned_graphs_leave_the_reversible_coupling_to_its_own_pass():
    """Under ``train.compile_autotune`` each graph times its matmuls on the device, so a coupled
    forward graph and the recomputation's could pick different kernels: the engine then keeps
    the coupling out of the blocks' graphs (reconstruction needs the forward's arithmetic)."""
    from revcol_dist.parallel.compile import compiled_kernels

    assert compiled_kernels(autotune=False, combo=False).couples
    assert not compiled_kernels(autotune=True, combo=False).couples
