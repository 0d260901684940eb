import os

import pytest
import torch

# Two cores here: keep each test process to one intra-op thread unless it asks otherwise.
torch.set_num_threads(int(os.environ.get("REVCOL_TEST_THREADS", "1")))


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
