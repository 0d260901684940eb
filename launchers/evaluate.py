"""Top-1/top-5 of a checkpoint on a val set.

  python launchers/evaluate.py --checkpoint runs/default/model_official.pth [--ema]
  python launchers/evaluate.py --checkpoint revcol_tiny_1k.pth --config configs/revcol_tiny_1k.yaml \\
      --set data.dataset=/data/imagenet-1k
  torchrun --nproc_per_node 4 launchers/evaluate.py --checkpoint runs/x/checkpoints/step_00001000
  python launchers/evaluate.py --checkpoint runs/x/checkpoints/step_00001000 --checkpoint runs/x/checkpoints/step_00002000

Our exports and checkpoint folders carry their training config, which is used unless --config is
given; the authors' .pth files carry none and need --config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from revcol_dist.cli import base_parser, run_cli  # noqa: E402


def parse_args(argv=None):
    ap = base_parser(__doc__, default_config=None)  # the checkpoint's own config comes first
    ap.add_argument("--checkpoint", required=True, action="append",
                    help="a .pth (released format) or a checkpoint folder; repeat it to evaluate several in one launch")
    ap.add_argument("--ema", action="store_true", help="evaluate the EMA weights (state_dict_ema)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        from revcol_dist.engine.evaluate import evaluate_checkpoint
        from revcol_dist.parallel.distributed import dist_env

        results = []
        for checkpoint in args.checkpoint:
            res = evaluate_checkpoint(checkpoint, args.config, args.overrides, use_ema=args.ema)
            results.append(res)
            if dist_env().is_main:
                print(f"top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}  "
                      f"({res['n']} images, {'EMA' if args.ema else 'weights'} of {checkpoint})", flush=True)
        if dist_env().is_main and args.json:  # one checkpoint: its result; several: the list
            Path(args.json).write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
