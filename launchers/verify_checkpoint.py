"""Verify checkpoint folders against the size and CRC-32 of every file, recorded while they were
written (complete.json). Exit status 1 if any is damaged.

  python launchers/verify_checkpoint.py runs/default/checkpoints/step_00001000 [more ...]
  python launchers/verify_checkpoint.py runs/default/checkpoints          (every checkpoint in it)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="checkpoint folders, or a folder of them")
    args = ap.parse_args(argv)
    from revcol_dist.engine.checkpoint import MARKER, read_marker, verify_checkpoint

    folders = []
    for p in args.paths:
        folders += [p] if (p / MARKER).is_file() or not p.is_dir() else sorted(p.glob("step_*")) or [p]
    damaged = 0
    for folder in folders:
        problems = verify_checkpoint(folder)
        if problems:
            damaged += 1
            print(f"{folder}: damaged: {'; '.join(problems)}")
            continue
        files = read_marker(folder).get("files")
        if files is None:
            print(f"{folder}: complete, but written without checksums: nothing to verify against")
        else:
            print(f"{folder}: intact ({len(files)} files, {sum(s for s, _ in files.values()) / 1e6:.1f} MB)")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
