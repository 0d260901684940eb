"""The console: a live ``rich`` progress bar per epoch on a terminal, plain lines elsewhere
(logs of batch jobs), and a summary table at the end. Silent on ranks other than 0."""

from __future__ import annotations

import sys
import time
from typing import Dict, Optional


class Console:
    def __init__(self, mode: str = "auto", enabled: bool = True, log_every: int = 10) -> None:
        from rich.console import Console as RichConsole

        self.rich = RichConsole(stderr=False)
        if mode == "auto":
            mode = "rich" if self.rich.is_terminal else "plain"
        self.mode = mode if enabled else "none"
        self.log_every = max(1, log_every)
        self.progress = None
        self.task = None
        self.t_epoch = time.time()

    def print(self, msg: str) -> None:
        if self.mode == "none":
            return
        if self.mode == "rich":
            self.rich.print(msg, highlight=False)
        else:
            print(msg, flush=True)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.t_epoch = time.time()
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        if self.mode != "rich":
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=self.rich, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, epoch=f"{epoch + 1}/{epochs}", stats="")

    def update(self, step_in_epoch: int, global_step: int, total: int, stats: Dict[str, float]) -> None:
        text = (f"loss {stats['loss']:.4f}  lr {stats['lr']:.2e}  {stats['images_per_sec']:.0f} img/s")
        if stats.get("mfu") is not None:
            text += f"  MFU {100 * stats['mfu']:.0f}%"
        if stats.get("data_wait_share") is not None:
            text += f"  data wait {100 * stats['data_wait_share']:.0f}%"
        if self.mode == "rich" and self.progress is not None:
            self.progress.update(self.task, completed=step_in_epoch, stats=text)
        elif self.mode == "plain" and (global_step % self.log_every == 0 or global_step == total):
            eta = (time.time() - self.t_epoch) / max(step_in_epoch, 1) * (total - global_step)
            print(f"epoch {self.epoch + 1}/{self.epochs} step {global_step}/{total} {text} eta {eta:.0f}s", flush=True)

    def end_epoch(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def summary(self, title: str, rows: Dict[str, str]) -> None:
        if self.mode == "none":
            return
        if self.mode == "rich":
            from rich.table import Table

            table = Table(title=title, show_header=False)
            table.add_column(style="bold")
            table.add_column()
            for k, v in rows.items():
                table.add_row(k, v)
            self.rich.print(table)
        else:
            width = max(len(k) for k in rows)
            print(title, flush=True)
            for k, v in rows.items():
                print(f"  {k.ljust(width)}  {v}", flush=True)
        sys.stdout.flush()
