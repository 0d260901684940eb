"""Keyed random draws: a function of (seed, step, sample index, stream) only, so a sample's
drop-path mask is the same whatever batch, split, rank or recomputation draws it."""

import pytest
import torch

from revcol_dist import randomness
from revcol_dist.models import create_model
from revcol_dist.randomness import SampleKeys, keyed, stream_id, uniform

from .reversible.test_gradients import SMALL, loss_of, worst_relative_error


def test_uniform_is_a_function_of_its_key():
    ids = torch.arange(10_000, dtype=torch.int64)
    u = uniform(0, 5, ids, 7)
    assert u.dtype == torch.float32 and u.shape == ids.shape
    assert torch.equal(u, uniform(0, 5, ids, 7))  # no generator state: the same draw every time
    assert torch.equal(u[1234:1240], uniform(0, 5, ids[1234:1240], 7))  # independent of the batch around it
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    # an independent reference: uniform moments and no visible correlation with neighbours
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.004
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.03
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert float(hist.min()) > 900 and float(hist.max()) < 1100
    for other in (uniform(1, 5, ids, 7), uniform(0, 6, ids, 7), uniform(0, 5, ids, 8)):
        assert float((other == u).float().mean()) < 0.01  # seed, step and stream all change the draw
    big = torch.tensor([3, 3 + 2**32, 3 + 2**40])  # indices beyond 32 bits still differ
    assert len(set(uniform(0, 0, big, 0).tolist())) == 3


def test_all_streams_at_once_draw_the_same_bits_as_one_at_a_time():
    """SampleKeys with its streams declared draws them together (a few dozen kernels per step
    instead of ~30 per drop path): bit for bit the per-stream draw, for every stream, seed,
    step, and index beyond 32 bits; an undeclared stream still draws alone."""
    from revcol_dist.models.layers import random_streams

    ids = torch.tensor([0, 1, 77, 2**31 + 5, 2**32 + 3, 2**40 + 9, 2**62 + 1], dtype=torch.int64)
    streams = random_streams(create_model("revcol_tiny", **dict(SMALL, drop_path=0.3)))
    assert len(streams) > 4
    for seed, step in ((0, 0), (1234567, 99), (2**40 + 3, 2**33)):
        keys = SampleKeys(seed, step, ids, streams)
        for s in streams:
            assert torch.equal(keys.uniform(s), uniform(seed, step, ids, s))
        assert torch.equal(keys.uniform(11), uniform(seed, step, ids, 11))
        halves = keys.split(2)  # micro-batches keep the declaration
        assert halves[1].streams == streams
        assert torch.equal(halves[1].uniform(streams[-1]), uniform(seed, step, ids[4:], streams[-1]))
    # no drop path, nothing to declare
    assert random_streams(create_model("revcol_tiny", **dict(SMALL, drop_path=0.0))) == ()


def test_a_step_held_on_the_device_draws_the_same_bits():
    """A captured CUDA graph reads the step from a device tensor (a host int would be baked into
    its kernels): the same draws as the host int, declared streams and a stream alone, and the
    step's value (not the tensor) decides them."""
    ids = torch.tensor([0, 5, 2**32 + 3, 2**40 + 9], dtype=torch.int64)
    streams = (11, 2**31 + 7, 4000000000)
    for seed, step in ((0, 0), (1234567, 99), (2**40 + 3, 2**31 + 1)):
        on_device = torch.tensor(step, dtype=torch.int64)
        assert torch.equal(uniform(seed, on_device, ids, 13), uniform(seed, step, ids, 13))
        host, device = SampleKeys(seed, step, ids, streams), SampleKeys(seed, on_device, ids, streams)
        for s in streams:
            assert torch.equal(device.uniform(s), host.uniform(s))
    held = torch.tensor(4, dtype=torch.int64)
    first = uniform(0, held, ids, 13)
    held.fill_(5)
    assert torch.equal(uniform(0, held, ids, 13), uniform(0, 5, ids, 13)) and not torch.equal(first, uniform(0, 5, ids, 13))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_declared_masks_made_together_equal_one_at_a_time(dtype):
    """With the streams' keep probabilities declared (the Trainer's), every mask is made in one
    pass: bitwise the mask of one stream at a time, for every rate of the recipe's linear
    schedule, draws at the boundary included, and in every dtype a block asks for."""
    from revcol_dist.models.layers import random_streams, stream_keeps

    model = create_model("revcol_tiny", **dict(SMALL, drop_path=0.3))
    streams = random_streams(model)
    keeps = stream_keeps(model, streams)
    assert len(set(keeps)) > 2 and all(0.5 < k < 1.0 for k in keeps)
    ids = torch.arange(5000, dtype=torch.int64)
    together, alone = SampleKeys(3, 8, ids, streams, keeps), SampleKeys(3, 8, ids, streams)
    for s, k in zip(streams, keeps):
        assert torch.equal(together.scaled_mask(s, k, dtype), alone.scaled_mask(s, k, dtype))
    assert together.scaled_mask(streams[0], 0.5, dtype).unique().tolist() == [0.0, 2.0]  # another rate: alone
    # draws exactly at a keep probability and one float step either side
    k = keeps[-1]
    at = torch.tensor(k, dtype=torch.float32)
    edge = torch.stack([at.nextafter(torch.tensor(0.0)), at, at.nextafter(torch.tensor(1.0))])
    together, alone = (SampleKeys(0, 0, torch.arange(3), (7,), (k,)), SampleKeys(0, 0, torch.arange(3), (7,)))
    for keys in (together, alone):
        keys.uniform(7)
        keys._cache[7] = edge
        keys._draws = edge[None]
    assert torch.equal(together.scaled_mask(7, k, dtype), alone.scaled_mask(7, k, dtype))
    assert together.split(2)[0].keeps == (k,)


def _model(p=0.5):
    torch.manual_seed(0)
    model = create_model("revcol_tiny", **dict(SMALL, drop_path=p)).double().train()
    with torch.no_grad():  # layer scale as trained (the 1e-6 init would hide what drop path does)
        for n, w in model.named_parameters():
            if n.endswith("gamma"):
                w.fill_(0.5)
    return model


def test_drop_path_masks_follow_the_sample_not_the_batch():
    """A sample's output is the same in a batch of 8 and in either half of it (a 2-rank split),
    and in the second of two micro-batches (grad_accum)."""
    model = _model()
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    ids = torch.arange(100, 108)
    with torch.no_grad(), keyed(SampleKeys(3, 11, ids)):
        whole = model(x).logits
    halves = []
    for part, keys in zip(x.tensor_split(2), SampleKeys(3, 11, ids).split(2)):
        with torch.no_grad(), keyed(keys):
            halves.append(model(part).logits)
    assert torch.allclose(whole, torch.cat(halves), rtol=1e-12, atol=1e-12)
    # other samples (another rank's) get other masks: same pixels, different indices, other outputs
    with torch.no_grad(), keyed(SampleKeys(3, 11, ids + 8)):
        other = model(x).logits
    assert (whole - other).abs().max() > 1e-3
    with torch.no_grad(), keyed(SampleKeys(3, 12, ids)):  # and the next step draws anew
        assert (whole - model(x).logits).abs().max() > 1e-3


def test_keyed_drop_path_keeps_the_published_rate():
    dp = _model(0.3).columns[0].level2.blocks[-1].drop_path
    ids = torch.arange(20_000)
    with keyed(SampleKeys(0, 0, ids)):
        mask = dp.scaled_mask(ids.numel(), 4, torch.float64, "cpu")
    keep = 1 - dp.p
    assert set(mask.unique().tolist()) == {0.0, 1 / keep}
    assert abs(float((mask > 0).double().mean()) - keep) < 0.01
    with keyed(SampleKeys(0, 0, ids[:3])), pytest.raises(ValueError, match="keyed batch has 3"):
        dp.scaled_mask(4, 4, torch.float64, "cpu")


def test_every_drop_path_has_its_own_stream():
    model = _model()
    streams = [m.stream for m in model.modules() if isinstance(m, type(model.columns[0].level0.blocks[0].drop_path))]
    assert len(streams) == len(set(streams)) > 4
    assert model.columns[1].level3.blocks[0].drop_path.stream == stream_id("columns.1.level3.blocks.0.drop_path")


@pytest.mark.parametrize("lean", [False, True])
def test_reversible_replays_keyed_masks(lean):
    """Recomputation in backward draws the forward's masks: reversible gradients equal plain
    autograd's with drop path on, without any generator state restored."""
    model = _model(0.4)
    model.policy = type(model.policy)(**{**model.policy.__dict__, "lean_blocks": lean})
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    labels = torch.tensor([1, 4, 0, 6])
    got = {}
    for reversible in (False, True):
        model.reversible = reversible
        model.zero_grad(set_to_none=True)
        torch.manual_seed(reversible)  # a different generator state each time: the keys must decide
        with keyed(SampleKeys(0, 2, torch.arange(4))):
            loss_of(model(x), labels).backward()
        got[reversible] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert randomness.current() is None
    assert worst_relative_error(got[False], got[True]) < 1e-9
