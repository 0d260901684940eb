"""A step's values on their way to the host (``engine/step_values.py``)."""

import torch

from revcol_dist.engine.step_values import StepValues
from revcol_dist.parallel.backends import StepLoss


def test_the_values_read_are_the_steps():
    result = StepLoss(torch.tensor(2.5), {"b": torch.tensor(0.25, dtype=torch.bfloat16), "a": torch.tensor(1.5)})
    v = StepValues(7, result, torch.tensor(False), 1e-3)
    assert (v.step, v.lr, v.loss, v.applied, v.parts) == (7, 1e-3, 2.5, False, {"a": 1.5, "b": 0.25})
    result.loss.fill_(9.0)  # read once, kept: later changes to the device tensors do not reach it
    assert v.loss == 2.5
    host = StepValues(8, StepLoss(torch.tensor(float("nan")), {}), True, 0.0)  # DeepSpeed decides on the host
    assert host.applied is True and host.loss != host.loss and host.parts == {}
