"""The whole test suite in two phases, each using both cores of a small machine (`make test`).

1. Single-process tests (not marked ``multiprocess``) on two pytest-xdist workers: each test
   process runs one intra-op thread (conftest.py), so two workers keep two cores busy.
2. Multi-process tests one at a time: each starts 2-4 real processes (gloo), which fill the
   cores on their own; two at once would compete for them and for ports.

Arguments go to both phases (``python tests/suite.py -k official``); ``REVCOL_TEST_WORKERS``
sets phase 1's workers (default 2). The last line counts both phases together, so a reader of
the log (CI) sees the whole suite's result; each phase lists its 15 slowest tests. The exit
status is non-zero if either phase failed, or if neither ran a test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_TESTS = 5  # pytest's exit status when a selection is empty

PHASES = [
    # loadgroup: a module marked xdist_group (test_compile.py) stays on one worker, which
    # compiles each inductor graph once instead of both workers compiling it
    ("single-process", ["-m", "not multiprocess", "-n", os.environ.get("REVCOL_TEST_WORKERS", "2"), "--dist", "loadgroup"]),
    ("multi-process", ["-m", "multiprocess", "-p", "no:xdist"]),
]


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


def main(args: list) -> int:
    total = {"passed": 0, "failed": 0, "skipped": 0}
    statuses = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name, selection in PHASES:
            junit = Path(tmp) / f"{name}.xml"
            print(f"\n=== {name} tests ===", flush=True)
            cmd = [sys.executable, "-m", "pytest", "-q", "--durations=15", *selection, f"--junitxml={junit}", *args]
            status = subprocess.call(cmd, cwd=REPO)
            statuses.append(status)
            for k, v in counts(junit).items():
                total[k] += v
    ran = [s for s in statuses if s != NO_TESTS]
    failed = not ran or any(s != 0 for s in ran)
    print(f"\nboth phases: {time.time() - t0:.0f} s")
    print(f"suite: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
