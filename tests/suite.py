"""The whole test suite on a small machine (`make test`), in phases that share the two cores.

1. In-process tests (not marked ``multiprocess``, ``launches`` or ``alone``) on two pytest-xdist
   workers (one intra-op thread each, conftest.py), a test file per worker at a time (``--dist
   loadfile``: a module's fixtures and the compiled-path tests' inductor graphs are built once),
   in Linux's idle scheduling class (SCHED_IDLE): they get the cores only when phase 2 leaves
   one idle.
2. At the same time, in the foreground at normal priority, one at a time: the multi-process
   tests (each starts 2-4 real processes on gloo that fill the cores on their own; two at once
   would compete for the cores and ports) and the single-process tests that wait on a launched
   process with a time limit (``launches``: a launcher, a benchmark), which idle priority could
   starve past their limit.
3. The few tests marked ``alone`` (they wait on a server or a browser with time limits), at the
   end, on a quiet machine.

``REVCOL_TEST_OVERLAP=0`` runs phase 1 before phase 2 instead, at normal priority (a cleaner log,
or to time a phase on its own). Arguments go to every phase (``python tests/suite.py -k
official``); ``REVCOL_TEST_WORKERS`` sets phase 1's workers (default 2). The output of the
overlapped phase 1 is printed when it ends; the last line counts every phase together, so a
reader of the log (CI) sees the whole suite's result. The exit status is non-zero if any phase
failed, or if none ran a test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_TESTS = 5  # pytest's exit status when a selection is empty

WORKERS = os.environ.get("REVCOL_TEST_WORKERS", "2")
# loadfile: a module's tests on one worker, so its module fixtures and inductor graphs are built
# once (xdist_group marks, --dist loadgroup, do not group under pytest 9.2 with xdist 3.8)
SINGLE = ("in-process", ["-m", "not multiprocess and not launches and not alone", "-n", WORKERS, "--dist", "loadfile"])
MULTI = ("launching", ["-m", "(multiprocess or launches) and not alone", "-n", "0"])
ALONE = ("alone", ["-m", "alone and not multiprocess", "-n", "0"])


def counts(junit: Path) -> dict:
    """passed / failed / skipped from a junit XML report (errors count as failed)."""
    out = {"passed": 0, "failed": 0, "skipped": 0}
    if not junit.is_file():
        return out
    for suite in ET.parse(junit).getroot().iter("testsuite"):
        tests, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        out["failed"] += failed
        out["skipped"] += skipped
        out["passed"] += tests - failed - skipped
    return out


def _idle_priority() -> None:
    """In the child before exec: run only on otherwise idle cores (inherited by its workers)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux: the lowest nice value at least
        os.nice(19)


class Phase:
    def __init__(self, name: str, selection: list, args: list, tmp: Path) -> None:
        self.name, self.junit = name, tmp / f"{name}.xml"
        self.cmd = [sys.executable, "-m", "pytest", "-q", "--durations=15", *selection, f"--junitxml={self.junit}",
                    f"--basetemp={tmp / name}", *args]  # its own temporary tree: phases may run at once
        self.log = tmp / f"{name}.log"
        self.status: int = NO_TESTS
        self.seconds = 0.0

    def run(self) -> int:
        """In the foreground, its output as it comes."""
        print(f"\n=== {self.name} tests ===", flush=True)
        t0 = time.time()
        self.status = subprocess.call(self.cmd, cwd=REPO)
        self.seconds = time.time() - t0
        return self.status

    def start_idle(self) -> threading.Thread:
        """In the background at idle priority, its output to a file (printed by ``finish``)."""
        t0, self._out = time.time(), open(self.log, "w")
        proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=self._out, stderr=subprocess.STDOUT,
                                preexec_fn=_idle_priority)

        def wait() -> None:
            self.status = proc.wait()
            self.seconds = time.time() - t0

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        return waiter

    def finish(self, waiter: threading.Thread) -> int:
        waiter.join()
        self._out.close()
        print(f"\n=== {self.name} tests (beside the launching ones, on idle cores) ===", flush=True)
        sys.stdout.write(self.log.read_text())
        sys.stdout.flush()
        return self.status


def main(args: list) -> int:
    serial = os.environ.get("REVCOL_TEST_OVERLAP", "1") == "0"
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        single, multi, alone = (Phase(n, s, args, Path(tmp)) for n, s in (SINGLE, MULTI, ALONE))
        if serial:
            single.run()
            multi.run()
        else:
            waiter = single.start_idle()
            try:
                multi.run()
            finally:
                single.finish(waiter)
        alone.run()
        phases = (single, multi, alone)
        total = {"passed": 0, "failed": 0, "skipped": 0}
        for phase in phases:
            for k, v in counts(phase.junit).items():
                total[k] += v
    ran = [p.status for p in phases if p.status != NO_TESTS]
    failed = not ran or any(s != 0 for s in ran)
    print("\n" + ", ".join(f"{p.name} {p.seconds:.0f} s" for p in phases)
          + f"; all phases: {time.time() - t0:.0f} s" + ("" if serial else " (phases 1 and 2 overlapped)"))
    print(f"suite: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
