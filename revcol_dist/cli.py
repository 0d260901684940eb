"""Shared command-line plumbing of the launchers: DeepSpeed's argument convention plus
``--config`` / ``--set``, and one-line errors (exit 2) for input that cannot be used."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, List, Optional

from .config import DEFAULT_CONFIG


def base_parser(doc: str, default_config: Optional[Path] = DEFAULT_CONFIG) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = str(default_config) if default_config is not None and default_config.is_file() else None
    ap.add_argument("--config", default=default,
                    help=f"YAML training config (configs/*.yaml; default: {default or 'the built-in defaults'})")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def add_deepspeed_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    try:
        import deepspeed

        return deepspeed.add_config_arguments(ap)  # --deepspeed, --deepspeed_config
    except ImportError:
        ap.add_argument("--deepspeed_config", default=None)
        return ap


def run_cli(body: Callable[[], None]) -> int:
    """Run ``body``; bad input becomes ``error: ...`` on stderr and exit status 2."""
    from .config import ConfigError
    from .data.folder import DataError
    from .engine.checkpoint import SaveError
    from .models.official import CheckpointError
    from .parallel.distributed import LaunchError

    try:
        body()
    except (ConfigError, DataError, CheckpointError, SaveError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
