"""Pre-train RevCol.

  python launchers/pretrain.py --config configs/default.yaml [--set train.lr=1e-3]
  torchrun --nproc_per_node 2 launchers/pretrain.py --config ...                     (DDP)
  deepspeed --num_gpus 2 launchers/pretrain.py --deepspeed_config ds_configs/zero3.json
  ... --resume auto       (continue from the newest complete checkpoint in output_dir)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from revcol_dist.cli import add_deepspeed_arguments, base_parser, run_cli  # noqa: E402


def parse_args(argv=None):
    ap = base_parser(__doc__)
    ap.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint folder")
    return add_deepspeed_arguments(ap).parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        from revcol_dist.config import load_config
        from revcol_dist.engine.train import train
        from revcol_dist.plan.policy import resolve_memory_policy

        cfg = load_config(args.config, args.overrides)
        cfg = resolve_memory_policy(cfg, getattr(args, "deepspeed_config", None))  # auto: the planner decides
        train(cfg, ds_config=getattr(args, "deepspeed_config", None), resume=args.resume)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
