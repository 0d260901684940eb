"""Fine-tune RevCol from pre-trained weights: the authors' released .pth, our
model_official.pth, or one of our checkpoint folders. Heads of another class count start anew
(scaled by model.args.head_init_scale); layer-wise LR decay from train.layer_decay.

  python launchers/finetune.py --config configs/revcol_base_1k_224_ft.yaml --pretrained revcol_base_22k.pth
  deepspeed --num_gpus 8 launchers/finetune.py --deepspeed_config ds_configs/zero2.json \\
      --config configs/revcol_large_1k_384_ft.yaml --pretrained runs/revcol_large_22k/model_official.pth
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from revcol_dist.cli import add_deepspeed_arguments, base_parser, run_cli  # noqa: E402


def parse_args(argv=None):
    ap = base_parser(__doc__)
    ap.add_argument("--pretrained", default=None,
                    help="weights to start from (sets train.pretrained; required unless the config sets it)")
    ap.add_argument("--resume", default=None, help="'auto' or a checkpoint folder of this fine-tune")
    return add_deepspeed_arguments(ap).parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        from revcol_dist.config import ConfigError, load_config
        from revcol_dist.engine.train import train
        from revcol_dist.plan.policy import resolve_memory_policy

        overrides = list(args.overrides) + ([f"train.pretrained={args.pretrained}"] if args.pretrained else [])
        cfg = load_config(args.config, overrides)
        if not cfg.train.pretrained:
            raise ConfigError("fine-tuning needs pre-trained weights: pass --pretrained PATH "
                              "(a .pth file or a checkpoint folder)")
        cfg = resolve_memory_policy(cfg, getattr(args, "deepspeed_config", None))  # auto: the planner decides
        train(cfg, ds_config=getattr(args, "deepspeed_config", None), resume=args.resume)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
