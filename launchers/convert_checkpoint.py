"""Add the layout-free form to a checkpoint written without it (train.portable_checkpoint=false,
or before the form existed), so that it resumes on any layout.

Run it as the checkpoint's run was launched (same launcher, world size, --deepspeed_config, the
run's config): every rank loads only its own share, as in a resume, and writes it.

  python launchers/convert_checkpoint.py --config RUN/config.yaml RUN/checkpoints/step_00000100
  torchrun --nproc_per_node 2 launchers/convert_checkpoint.py --config RUN/config.yaml \\
      --deepspeed_config ds_configs/zero3.json RUN/checkpoints/step_00000100
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from revcol_dist.cli import add_deepspeed_arguments, base_parser, run_cli  # noqa: E402


def parse_args(argv=None):
    ap = base_parser(__doc__)
    ap.add_argument("checkpoint", help="a complete checkpoint folder (step_XXXXXXXX)")
    return add_deepspeed_arguments(ap).parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        from revcol_dist.config import load_config
        from revcol_dist.engine.train import Trainer
        from revcol_dist.parallel import comm

        cfg = load_config(args.config, args.overrides + ["monitor.tensorboard=false"])
        trainer = Trainer(cfg, getattr(args, "deepspeed_config", None))
        folder = trainer.convert(Path(args.checkpoint))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peaks = comm.all_gather_object(peak)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        trainer.say(f"wrote {folder} ({size / 2**20:.0f} MiB); peak host memory per rank "
                    f"{', '.join(f'{p / 2**20:.0f}' for p in peaks)} MiB")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
