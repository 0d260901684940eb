"""A hang watchdog: when a step takes longer than ``train.hang_timeout_s``, every rank writes
its Python stacks, its step and phase, and which rank never reached the step's first
collective, then the job exits non-zero (torchrun ``--max-restarts`` or a SLURM requeue then
resumes from the last checkpoint).

Each rank announces, through the process group's key-value store, the step it has reached
just before that step's first collective (``reached``). A rank that hangs (a stuck file
system, a dead GPU) stays one step behind: the others time out in the collective and name it.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Optional

EXIT_CODE = 75  # the job did not finish, a restart may: EX_TEMPFAIL
GRACE_S = 3.0  # after firing, before exiting: the other ranks see the flag and write their stacks too
_KEY = "revcol/watchdog/reached/{}"
_FIRED = "revcol/watchdog/fired"


class HangWatchdog:
    def __init__(self, timeout_s: float, rank: int, world_size: int, store=None,
                 log_dir: Optional[Path] = None) -> None:
        self.timeout_s, self.rank, self.world_size, self.store = timeout_s, rank, world_size, store
        self.log_dir = log_dir
        self.step, self.phase = 0, "start"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="revcol-hang-watchdog", daemon=True)

    def start(self) -> None:
        """Watch from now on (the Trainer starts it with the loop and closes it when the loop ends)."""
        if self.timeout_s > 0 and not self._thread.is_alive():
            self._last = time.monotonic()
            self._thread.start()

    def beat(self, step: int, phase: str) -> None:
        """Progress: the rank is at ``phase`` of ``step`` (training, each evaluation batch, saving).
        Every phase gets ``timeout_s``: set it above the longest save."""
        self.step, self.phase, self._last = step, phase, time.monotonic()

    def reached(self, step: int) -> None:
        """This rank is about to enter ``step``'s first collective."""
        self.beat(step, "forward_backward")
        if self.store is not None and self.timeout_s > 0:
            self.store.set(_KEY.format(self.rank), str(step))

    def close(self) -> None:
        self._stop.set()

    # ---- firing --------------------------------------------------------------------------

    def _watch(self) -> None:
        period = max(0.2, min(1.0, self.timeout_s / 10))
        while not self._stop.wait(period):
            if time.monotonic() - self._last > self.timeout_s:
                self._fire(f"rank {self.rank} made no progress for {self.timeout_s:.0f} s (train.hang_timeout_s)")
            elif self._flag() is not None:
                self._fire(f"rank {self._flag()}'s watchdog fired; rank {self.rank} was still making progress")

    def _flag(self) -> Optional[int]:
        """The rank whose watchdog fired first, once one has (through the store)."""
        try:
            if self.store is not None and self.store.check([_FIRED]):
                return int(self.store.get(_FIRED).decode())
        except Exception:  # the store went away with its host
            pass
        return None

    def _reached_by_rank(self) -> Dict[int, Optional[int]]:
        out: Dict[int, Optional[int]] = {}
        if self.store is None:
            return out
        for r in range(self.world_size):
            try:
                out[r] = int(self.store.get(_KEY.format(r)).decode())
            except Exception:  # never announced, or the store is gone with rank 0
                out[r] = None
        return out

    def report(self, reason: str) -> str:
        """Why, who is where, and which ranks are behind."""
        reached = self._reached_by_rank()
        lines = [f"hang watchdog: {reason}; rank {self.rank} is at step {self.step}, phase {self.phase}"]
        if reached:
            known = [s for s in reached.values() if s is not None]
            front = max(known) if known else None
            behind = [r for r, s in reached.items() if s is None or (front is not None and s < front)]
            if behind:
                lines.append(f"hang watchdog: stuck rank(s) {', '.join(map(str, behind))}: did not reach step "
                             f"{front}'s first collective (reached: "
                             f"{', '.join(f'rank {r} step {s}' for r, s in reached.items())})")
            else:
                lines.append(f"hang watchdog: every rank reached step {front}'s first collective; the hang is "
                             f"inside it or after")
        return "\n".join(lines)

    def _fire(self, reason: str) -> None:
        if self.store is not None and self._flag() is None:
            try:
                self.store.set(_FIRED, str(self.rank))  # every other rank's watchdog fires too
            except Exception:
                pass
        text = self.report(reason)
        streams = [sys.stderr]
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            streams.append(open(self.log_dir / f"hang_rank{self.rank:05d}.log", "w"))
        for f in streams:
            print(text, file=f, flush=True)
            print(f"hang watchdog: Python stacks of rank {self.rank}:", file=f, flush=True)
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.flush()
        time.sleep(GRACE_S)  # the launcher stops the others when one exits: let them write first
        os._exit(EXIT_CODE)
