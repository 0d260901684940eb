"""Pre-train RevCol.

  python launchers/pretrain.py --config configs/default.yaml [--set train.lr=1e-3]
  torchrun --nproc_per_node 2 launchers/pretrain.py --config ...                     (DDP)
  deepspeed --num_gpus 2 launchers/pretrain.py --deepspeed_config ds_configs/zero3.json
  ... --resume auto       (continue from the newest complete checkpoint in output_dir)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from revcol_dist.config import ConfigError, load_config  # noqa: E402
from revcol_dist.data.folder import DataError  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML training config (configs/*.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    ap.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint folder")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    try:
        import deepspeed

        ap = deepspeed.add_config_arguments(ap)  # --deepspeed, --deepspeed_config
    except ImportError:
        ap.add_argument("--deepspeed_config", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from revcol_dist.engine.train import train

        train(cfg, ds_config=getattr(args, "deepspeed_config", None), resume=args.resume)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
