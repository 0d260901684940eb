"""The pipeline's point-to-point plan under NCCL's rules, simulated: each rank runs its batches
of transfers in order on one stream (a batch is one NCCL group), a transfer completes only when
both ends have posted it (rendezvous: no buffering to hide a bad order), and messages between
two ranks match in the order posted, not by tag. gloo buffers and matches differently, so the
real-process tests cannot see a plan that would hang on GPUs; this does."""

from collections import defaultdict

import pytest

from revcol_dist.parallel.pipeline.schedule import Transfer, one_f_one_b, p2p_slots


def _simulate(programs):
    """programs[s]: stage s's batches, each a list of ("send"|"recv", Transfer). Returns the
    messages of each directed channel in send order and receive order; raises on a deadlock."""
    stages = len(programs)
    pos, posted = [0] * stages, [None] * stages
    sent, received = defaultdict(list), defaultdict(list)
    while any(pos[s] < len(programs[s]) for s in range(stages)):
        progress = False
        for s in range(stages):
            if pos[s] < len(programs[s]) and posted[s] is None:
                mine = []
                for op, t in programs[s][pos[s]]:
                    if op == "send":
                        ch = (s, s + t.towards)
                        mine.append((sent, ch, len(sent[ch]), received))
                        sent[ch].append(t)
                    else:
                        ch = (s - t.towards, s)
                        mine.append((received, ch, len(received[ch]), sent))
                        received[ch].append(t)
                posted[s], progress = mine, True
        for s in range(stages):
            if posted[s] is not None and all(len(other[ch]) > i for _, ch, i, other in posted[s]):
                pos[s], posted[s], progress = pos[s] + 1, None, True
        if not progress:
            raise RuntimeError(f"deadlock: stages at batches {pos}")
    return sent, received


def _batched(stages, micro):
    return [[[("send", t) for t in sl.sends] + [("recv", t) for t in sl.recvs] for sl in p2p_slots(s, stages, micro)]
            for s in range(stages)]


def _one_by_one(stages, micro):
    """The engine before the batching: every transfer its own operation, in program order."""
    programs = []
    for s in range(stages):
        ops = []
        for kind, m in one_f_one_b(s, stages, micro):
            if kind == "F":
                ops += [[("recv", Transfer("act", m))]] if s > 0 else []
                ops += [[("send", Transfer("act", m))]] if s < stages - 1 else []
            else:
                ops += [[("recv", Transfer("grad", m))]] if s < stages - 1 else []
                ops += [[("send", Transfer("grad", m))]] if s > 0 else []
        programs.append(ops)
    return programs


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("micro", [1, 2, 3, 5, 8, 16])
def test_batched_plan_never_deadlocks_and_matches_in_order(stages, micro):
    sent, received = _simulate(_batched(stages, micro))
    for s in range(stages - 1):  # every activation forward and every gradient back, once, in order
        assert sent[(s, s + 1)] == received[(s, s + 1)] == [Transfer("act", m) for m in range(micro)]
        assert sent[(s + 1, s)] == received[(s + 1, s)] == [Transfer("grad", m) for m in range(micro)]
    assert set(sent) == set(received) == {(s, s + d) for s in range(stages) for d in (1, -1) if 0 <= s + d < stages}


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("micro", [2, 4, 8])
def test_one_by_one_transfers_would_deadlock(stages, micro):
    """The control: the simulation does catch the order NCCL hangs on at real sizes."""
    with pytest.raises(RuntimeError, match="deadlock"):
        _simulate(_one_by_one(stages, micro))


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("micro", [1, 3, 8])
def test_each_action_gets_its_inputs_in_its_own_slot(stages, micro):
    for s in range(stages):
        slots = p2p_slots(s, stages, micro)
        assert [sl.action for sl in slots[:-1]] == one_f_one_b(s, stages, micro) and slots[-1].action is None
        for sl in slots[:-1]:
            kind, m = sl.action
            needs = {("F", True): [], ("F", False): [Transfer("act", m)],
                     ("B", True): [], ("B", False): [Transfer("grad", m)]}
            assert list(sl.recvs) == needs[(kind, s == 0 if kind == "F" else s == stages - 1)]
        # in the steady state the forward's output leaves with the next backward's gradient
        steady = [sl for sl in slots if sl.sends and sl.recvs and sl.sends[0].kind != sl.recvs[0].kind]
        if 0 < s < stages - 1 and micro > stages - s - 1:
            assert steady
