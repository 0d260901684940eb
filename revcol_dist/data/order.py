"""Which samples a rank reads, in which order: deterministic per (seed, epoch), sharded
across ranks and nodes, resumable mid-epoch. Shared by the FFCV and fallback loaders."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ShardedOrder:
    num_samples: int
    batch_size: int  # per rank
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True  # train: equal full batches on every rank; eval: every sample once
    epoch: int = 0
    batches_done: int = 0  # in the current epoch (for resume)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.drop_last and self.num_samples < self.batch_size * self.world_size:
            raise ValueError(
                f"{self.num_samples} samples cannot fill one batch of {self.batch_size} on each of "
                f"{self.world_size} ranks: lower the batch size"
            )

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's samples for ``epoch``, in order (all of them, from the epoch's start)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.num_samples, generator=g).numpy()
        else:
            perm = np.arange(self.num_samples)
        if self.drop_last:
            # Global batch b is perm[b*G:(b+1)*G] (G = batch_size x world_size); rank r reads its
            # slice of it, so any number of ranks trains on the same global batches.
            g = self.batch_size * self.world_size
            n_batches = self.num_samples // g
            glob = perm[: n_batches * g].reshape(n_batches, self.world_size, self.batch_size)
            return glob[:, self.rank, :].reshape(-1)
        return perm[self.rank :: self.world_size]

    def batches_in_epoch(self, epoch: int) -> int:
        n = len(self.epoch_indices(epoch))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def remaining_indices(self) -> np.ndarray:
        """What is left of the current epoch (after a resume, the unseen tail)."""
        return self.epoch_indices(self.epoch)[self.batches_done * self.batch_size :]

    def advance(self, batches: int = 1) -> None:
        self.batches_done += batches
        if self.batches_done >= self.batches_in_epoch(self.epoch):
            self.epoch += 1
            self.batches_done = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed,
                "num_samples": self.num_samples, "world_size": self.world_size, "batch_size": self.batch_size}

    def global_position(self) -> dict:
        """Where the run is in its data, in terms no layout changes: the epoch, the global
        batches done in it, the global batch size."""
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed,
                "num_samples": self.num_samples, "global_batch": self.batch_size * self.world_size}

    def load_global_position(self, pos: dict, allow_batch_change: bool = False) -> None:
        """Continue from ``global_position()`` of another layout. Another global batch is an
        error unless allowed; then the position is mapped to the first batch boundary at or
        before the same number of samples into the epoch (the epoch's order is the same)."""
        if pos["num_samples"] != self.num_samples or pos["seed"] != self.seed:
            raise ValueError(f"cannot resume the data position: the checkpoint read {pos['num_samples']} samples "
                             f"with seed {pos['seed']}, this run {self.num_samples} with seed {self.seed}")
        mine = self.batch_size * self.world_size
        done = pos["batches_done"]
        if pos["global_batch"] != mine:
            if not allow_batch_change:
                raise ValueError(f"the checkpoint was trained with the global batch {pos['global_batch']}, this run "
                                 f"has {mine}: set train.batch_size={pos['global_batch']}, or "
                                 f"train.allow_batch_change=true to continue with {mine}")
            done = done * pos["global_batch"] // mine
        self.epoch, self.batches_done = pos["epoch"], done

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_samples", "world_size", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data position: the checkpoint has {key}={state[key]}, "
                    f"this run has {getattr(self, key)}"
                )
        self.epoch, self.batches_done, self.seed = state["epoch"], state["batches_done"], state["seed"]
