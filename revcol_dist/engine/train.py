"""The training loop: one Trainer for a single process, DDP, DeepSpeed ZeRO and the column
pipeline. The constructor builds the parts; ``train()`` runs epochs of ``train_step()``; a
step is ``forward_backward()`` over the micro-batches, then the backend's ``step()``.
Everything parallel sits behind the Backend contract (``parallel/backends.py``)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch

from ..config import Config, ConfigError, dump_config, validate_layout
from ..data.mixup import Mixup
from ..data.sources import build_streams, prepare_data
from ..files import atomic_save
from ..models import create_model
from ..models.init import initialize
from ..models.layers import random_streams, stream_keeps
from ..models.flops import train_flops_per_image
from ..models.official import rename_to_official
from ..monitor.console import Console
from ..monitor.system import peak_memory_bytes
from ..monitor.throughput import Throughput, missing_peak, peak_tflops
from ..monitor.tensorboard import RECONSTRUCTIONS, Board, alpha_histograms, front_page, reconstruction_grid, tagged
from ..parallel import comm
from ..parallel.backends import Applied, Backend, DeepSpeedBackend, LocalBackend, StepLoss
from ..parallel.compile import apply_compile, compile_loss
from ..parallel.cuda_graph import GRAPH_WARMUP, graph_forward_backward
from ..parallel.deepspeed_env import restore_functional_linear
from ..parallel.distributed import device_for, dist_env, init_distributed, process_store
from ..parallel.ds_config import resolve_ds_config, zero_stage
from ..parallel.zero3_params import local_partitions
from ..randomness import SampleKeys
from .checkpoint import CheckpointManager, read_marker, rng_state, set_rng_state
from .ema import ModelEMA
from .evaluate import evaluate
from .losses import RevColLoss
from .optim import make_optimizer, wants_cpu_adam
from .portable_checkpoint import FOLDER as PORTABLE
from .portable_checkpoint import load_portable, portable_folder, write_portable
from .schedule import lr_at
from .step_values import StepValues
from .watchdog import HangWatchdog


def _configure_kernels(t, device: torch.device) -> None:
    """cuDNN autotuning and TF32, from the training config (docs/training.md, GPU settings)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = t.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = t.tf32
    torch.backends.cudnn.allow_tf32 = t.tf32


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the message says what to change."""


def _model_meta(cfg: Config, model) -> dict:
    c = model.config
    return {"model": cfg.model.name, "channels": list(c.channels), "layers": list(c.layers),
            "num_columns": c.num_columns, "num_classes": c.num_classes}


def _maybe_inject_fault(step: int, info) -> None:
    """Fault injection for resilience tests: REVCOL_FAULT_STEP=N kills the last rank right after
    step N, on the first attempt only (torchrun counts restarts in TORCHELASTIC_RESTART_COUNT)."""
    at = os.environ.get("REVCOL_FAULT_STEP")
    if at and step == int(at) and info.rank == info.world_size - 1 \
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os._exit(13)


def _maybe_hang(step: int, info) -> None:
    """Fault injection: REVCOL_HANG_STEP=N makes the last rank hang before step N's first
    collective, on the first attempt only."""
    at = os.environ.get("REVCOL_HANG_STEP")
    if at and step == int(at) and info.rank == info.world_size - 1 \
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        time.sleep(10**6)


@contextlib.contextmanager
def _file_size_limit(step: int):
    """Fault injection: REVCOL_FSIZE_LIMIT=N:BYTES limits the size of each file written while the
    checkpoint of step N is saved (a full disk, as `ulimit -f` would), lifted afterwards."""
    spec = os.environ.get("REVCOL_FSIZE_LIMIT", "")
    at, _, limit = spec.partition(":")
    if not spec or int(at) != step:
        yield
        return
    import resource

    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)


def _nan_injected(step: int, info) -> bool:
    """Fault injection: REVCOL_NAN_STEPS=3,4 makes rank 0's loss NaN at those (1-based) steps."""
    steps = os.environ.get("REVCOL_NAN_STEPS")
    return bool(steps) and info.rank == 0 and step in {int(s) for s in steps.split(",")}


class Trainer:
    def __init__(self, cfg: Config, ds_config: Optional[str] = None, log: Optional[Callable[[str], None]] = None):
        self.cfg, t = cfg, cfg.train
        self.info = info = dist_env()
        # checked before any process group exists: bad input fails fast
        self.ds = resolve_ds_config(ds_config, cfg, info.world_size) if ds_config is not None else None
        validate_layout(cfg, info.world_size, self.ds)
        init_distributed(info, use_deepspeed=self.ds is not None, timeout_s=cfg.distributed.timeout_s)
        self.device = device_for(info)
        if t.cuda_graph and self.device.type != "cuda":
            raise ConfigError(f"train.cuda_graph=true needs a CUDA device; this run is on {self.device.type}: "
                              f"set train.cuda_graph=false")
        _configure_kernels(t, self.device)
        self.out_dir = Path(cfg.output_dir)
        self.console = Console(cfg.monitor.console, enabled=info.is_main, log_every=t.log_every)
        self.say = (log if log is not None else self.console.print) if info.is_main else (lambda *_: None)
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out_dir / "config.yaml")
            prepare_data(cfg.data)  # the embedded data once, before the other ranks read it
        comm.barrier()

        # data: replicas of the whole model (pipeline: of the whole pipeline; its stages read the same batches)
        stages = cfg.pipeline.stages
        self.replicas, self.replica = info.world_size // stages, info.rank // stages
        self.micro_batches = cfg.pipeline.micro_batches if stages > 1 else t.grad_accum
        self.train_stream, self.val_stream = build_streams(cfg.data, t.batch_size, t.seed, self.replica, self.replicas,
                                                           device=self.device,  # on a GPU: uint8 crosses, finished there
                                                           eval_batch=t.eval_batch_size)
        self.steps_per_epoch = self.train_stream.order.batches_in_epoch(0)
        self.total = self.steps_per_epoch * t.epochs if t.max_steps is None else \
            min(self.steps_per_epoch * t.epochs, t.max_steps)
        self.warmup = int(t.warmup_epochs * self.steps_per_epoch)
        scale = t.batch_size / t.lr_base_batch if t.lr_base_batch else 1.0
        self.lr_at = partial(lr_at, total_steps=self.total, warmup_steps=self.warmup, base_lr=t.lr * scale,
                             min_lr=t.min_lr * scale, warmup_lr=t.warmup_lr * scale)

        torch.manual_seed(t.seed)  # python's and numpy's too: a checkpoint's RNG states are the run's, not the process's
        random.seed(t.seed)
        np.random.seed(t.seed)
        self.model = self._build_model()
        self.meta = _model_meta(cfg, self.model)
        self.streams = random_streams(self.model)  # drop path's draws, all at once per micro-batch
        self.keeps = stream_keeps(self.model, self.streams)  # and its masks
        self.backend = self._build_backend()
        compiled = apply_compile(self.model, t.compile, self.device, t.compile_autotune, t.compile_combo)
        if compiled:
            self.say(compiled)
        if t.cuda_graph:
            self.say(self._capture_steps())
        self.model.train()
        self.ema = ModelEMA(self.backend.model, t.ema_decay) if t.ema_decay > 0 else None
        mixer = Mixup(self.train_stream.num_classes, cfg.data.mixup, cfg.data.cutmix, cfg.data.mixup_prob,
                      cfg.data.mixup_switch_prob, t.label_smoothing, t.seed)
        self.mixer = mixer if mixer.enabled else None
        # with mixup/cutmix the soft targets carry the smoothing
        self.loss_fn = RevColLoss(self.train_stream.mean, self.train_stream.std,
                                  0.0 if self.mixer is not None else t.label_smoothing)
        compile_loss(self.loss_fn, t.compile, self.device)
        self.ckpts = CheckpointManager(self.out_dir / "checkpoints", info.rank, info.world_size, t.keep_checkpoints,
                                       on_error=t.on_save_error, asynchronous=t.async_checkpoint, log=self.say)
        self.watchdog = HangWatchdog(t.hang_timeout_s, info.rank, info.world_size, process_store(), self.out_dir)
        self.step, self.nan_skipped, self.nan_run = 0, 0, 0
        self.images_seen, self.last_loss, self.last_parts = 0, float("nan"), {}
        self.unsettled: Optional[StepValues] = None  # the last step, until its values are read
        peak = peak_tflops(self.device, t.precision, t.tf32, cfg.monitor.peak_tflops)
        self.throughput = Throughput(train_flops_per_image(self.model.config, cfg.data.img_size), info.world_size, peak)
        self.board = Board(self.out_dir / "tensorboard", enabled=cfg.monitor.tensorboard and info.is_main)
        num_aux = len(self.model.config.head_columns) - 1 if self.model.config.inter_supv else 0
        self.board.layout(front_page(num_aux, mfu=peak is not None))
        if peak is None:
            self.say(missing_peak(self.device))
        self.shown = None  # the samples whose reconstructions are shown, the same all run

    # ---- building ----------------------------------------------------------------------

    def _build_model(self):
        """Weights keyed by (seed, parameter name) however the model is built: whole; under
        ``zero.Init`` (never whole on one rank); on the meta device for the pipeline, whose
        engine gives storage and weights to its own stage's modules only."""
        cfg, seed = self.cfg, self.cfg.train.seed
        args = dict(cfg.model.args)
        args.setdefault("num_classes", self.train_stream.num_classes)
        if cfg.model.memory_policy == "auto":
            raise ConfigError("model.memory_policy=auto is decided by the launchers (revcol_dist.plan.policy."
                              "resolve_memory_policy, before the Trainer): call it first, or set reversible or plain")
        if cfg.model.memory_policy == "plain":
            args["reversible"] = False
        if cfg.pipeline.stages > 1:
            with torch.device("meta"):
                return create_model(cfg.model.name, **args)  # pretrained weights: per stage, in _build_backend
        if self.ds is not None and zero_stage(self.ds) == 3:
            import deepspeed

            with deepspeed.zero.Init(config_dict_or_path=self.ds):
                model = create_model(cfg.model.name, **args)
            initialize(model, seed, gather=local_partitions)  # the same keyed values on every rank: no broadcast
        else:
            model = create_model(cfg.model.name, **args)
            initialize(model, seed)
        if cfg.train.pretrained:
            from .pretrained import load_pretrained

            self.say(load_pretrained(model, cfg.train.pretrained).summary())
        if cfg.train.channels_last:  # convolution weights NHWC, like the images (validate_layout: not ZeRO-3)
            model = model.to(memory_format=torch.channels_last)
        return model

    def _build_backend(self) -> Backend:
        t, cfg = self.cfg.train, self.cfg
        optimizer = partial(make_optimizer, name=t.optimizer, weight_decay=t.weight_decay, layer_decay=t.layer_decay,
                            cpu_adam=wants_cpu_adam(t.optimizer, self.ds, self.device))
        if cfg.pipeline.stages > 1:
            from ..parallel.pipeline.backend import PipelineBackend

            backend = PipelineBackend(self.model, self.info, cfg.pipeline, optimizer, t.precision,  # builds its stage
                                      t.clip_grad, res=cfg.data.img_size, device=self.device, seed=t.seed,
                                      log=self.say)
            if t.pretrained:  # each stage reads its own tensors of the file
                from .pretrained import load_pretrained

                mine = {k for k, v in self.model.state_dict().items() if v.numel()}
                self.say(load_pretrained(self.model, t.pretrained, only=mine.__contains__).summary())
            if t.channels_last:
                self.model.to(memory_format=torch.channels_last)
            return backend
        if self.ds is not None:
            return DeepSpeedBackend(self.model, self.info, self.ds, optimizer, t.precision)
        return LocalBackend(self.model, self.info, optimizer, self.device, t.precision, t.clip_grad)

    def _capture_steps(self) -> str:
        """``train.cuda_graph``: the backend's forward and backward captured and replayed."""
        try:
            graph_forward_backward(self.backend, warmup=GRAPH_WARMUP)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return (f"train.cuda_graph: forward and backward captured after {GRAPH_WARMUP} eager steps, then replayed "
                f"as one CUDA graph (a batch of another shape runs eagerly beside it)")

    # ---- the loop ----------------------------------------------------------------------

    def train(self) -> Dict[str, float]:
        t0 = time.time()
        self.watchdog.start()
        try:
            while self.step < self.total:
                self._train_epoch()
            self.settle()
            return self._finish(time.time() - t0)
        finally:
            self.console.end_epoch()
            self.watchdog.close()

    def _train_epoch(self) -> None:
        t = self.cfg.train
        epoch = self.step // self.steps_per_epoch
        self.console.start_epoch(epoch, t.epochs, min(self.steps_per_epoch, self.total - epoch * self.steps_per_epoch))
        batches = iter(self.train_stream)
        while True:
            waited = time.perf_counter()
            try:
                images, labels, indices = next(batches)
            except StopIteration:
                break
            self.throughput.waited(time.perf_counter() - waited)  # the step could not start before
            self.train_step(images, labels, indices)
            if self.step >= self.total or self.step - epoch * self.steps_per_epoch >= self.steps_per_epoch:
                break
        self.console.end_epoch()
        done = self.step // self.steps_per_epoch
        if t.eval_every_epochs and self.step % self.steps_per_epoch == 0 and done % t.eval_every_epochs == 0 \
                and self.step < self.total:
            self.validate(f"epoch {done}")

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> Applied:
        """One optimizer step on this rank's share of the global batch (``indices``: each
        sample's index in the data set, which keys its random draws). Returns whether it applied:
        a device tensor where the optimizer decides on the device (reading it waits for the step;
        the Trainer reads it a step later, in ``settle``)."""
        lr = self.lr_at(self.step)
        images = images.to(self.device, non_blocking=True)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = labels.to(self.device, non_blocking=True)
        if self.mixer is not None:  # adjacent pairs of the global batch: whole on every rank and micro-batch
            images, targets = self.mixer(images, targets, self.step)
        _maybe_hang(self.step + 1, self.info)
        self.watchdog.reached(self.step + 1)  # the step's first collective follows
        keys = SampleKeys(self.cfg.train.seed, self.step, indices.to(self.device, non_blocking=True), self.streams,
                          self.keeps)
        result = self.forward_backward(images, targets, keys)
        self.settle()  # the step before's loss and skip: the device meanwhile runs this step's work
        applied = self.backend.step(lr)
        self.step += 1
        _maybe_inject_fault(self.step, self.info)
        self.unsettled = StepValues(self.step, result, applied, lr)  # on their way to the host
        self._log_step(lr, images)
        self.watchdog.beat(self.step, "train")
        t = self.cfg.train
        if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < self.total:
            self.save()
        if t.eval_every_steps and self.step % t.eval_every_steps == 0 and self.step < self.total:
            self.validate(f"step {self.step}")
        return applied

    def settle(self) -> None:
        """The last step's host reads, one step late: its loss, whether it applied (skips are
        counted, a run of them stops training), its line in train_log.jsonl, its EMA update.
        Called after the next step's forward and backward are queued (the weights are still
        the settled step's until that step's update); the values were copied to pinned memory
        behind the settled step's work (``StepValues``), so reading them waits for that step
        only and the next step's work stays queued. Also before anything that needs them
        (logging, evaluation, a checkpoint, the end)."""
        done, self.unsettled = self.unsettled, None
        if done is None:
            return
        applied = done.applied  # waits for that step's work only
        self.last_loss, self.last_parts = done.loss, done.parts  # the same on every rank
        self._count_skips(applied, done.step)
        if applied and self.ema is not None:
            self.ema.update()
        if self.info.is_main:
            with open(self.out_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": done.step, "loss": self.last_loss, "lr": done.lr, "skipped": not applied})
                        + "\n")

    def forward_backward(self, images: torch.Tensor, targets: torch.Tensor, keys: SampleKeys) -> StepLoss:
        """Gradients of the rank's batch, accumulated over ``micro_batches`` equal parts (the
        pipeline's micro-batches, or train.grad_accum): memory of one part, the update of all.
        Drop path draws by ``keys``: the same masks whatever the split and the rank."""
        if _nan_injected(self.step + 1, self.info):  # rank 0 reads images on every backend (pipeline: stage 0)
            images = images * float("nan")
        n = self.micro_batches  # validate_layout made the rank's batch divisible by it
        micro = list(zip(images.tensor_split(n), targets.tensor_split(n), keys.split(n)))
        return self.backend.forward_backward(micro, self.loss_fn)

    def _count_skips(self, applied: bool, step: int) -> None:
        if applied:
            self.nan_run = 0
            return
        self.nan_skipped += 1
        self.nan_run += 1
        self.say(f"step {step}: non-finite loss or gradients ({self.last_loss}); step skipped "
                 f"({self.nan_run} in a row, {self.nan_skipped} in all)")
        limit = self.cfg.train.max_nan_skips
        if self.nan_run > limit:
            raise TrainingError(
                f"the loss or gradients were non-finite for {self.nan_run} steps in a row (last at step "
                f"{step}); lower train.lr, set train.clip_grad, or use train.precision=bf16/fp32 "
                f"(train.max_nan_skips={limit})")

    # ---- monitoring --------------------------------------------------------------------

    def _log_step(self, lr: float, images: torch.Tensor) -> None:
        """Scalars, alphas and pictures at their intervals (host reads: the step settles first);
        the console's bar every step, with the last settled loss."""
        t, m = self.cfg.train, self.cfg.monitor
        n_img = images.shape[0] * self.replicas
        self.images_seen += n_img
        self.throughput.stepped(n_img)
        rates = self.throughput.window()  # over the current logging window
        in_epoch = self.step - (self.step - 1) // self.steps_per_epoch * self.steps_per_epoch
        if self.step % t.log_every == 0 or self.step == self.total or self.step == 1:
            self.settle()
            self._log_scalars(lr, rates)
            self.throughput.reset()
        if self.step % (m.alpha_every or t.log_every) == 0 or self.step == self.total:
            alphas = self.backend.alphas()  # collective under ZeRO-3 and the pipeline
            self.board.histograms(alpha_histograms(alphas), self.step)
            self.board.add(tagged({"alpha_min": min(float(a.abs().min()) for a in alphas.values())}), self.step)
        if m.images_every and self.model.config.inter_supv and \
                (self.step % m.images_every == 0 or self.step in (1, self.total)):  # the first and last: before/after
            self._log_reconstructions(images)
        # the live bar moves every step; plain lines appear every log_every (Console decides)
        self.console.update(in_epoch, self.step, self.total, {"loss": self.last_loss, "lr": lr, **rates})

    def _log_scalars(self, lr: float, rates: Dict[str, Optional[float]]) -> None:
        n_heads = len(self.model.heads)
        norm = self.backend.last_grad_norm
        scalars = {"loss": self.last_loss, "lr": lr, "grad_norm": None if norm is None else float(norm),
                   "mem_peak_bytes": peak_memory_bytes(self.device), "drift": self.backend.drift, **rates}
        for k, v in self.last_parts.items():
            scalars[k.replace("loss_cls_final", f"loss_cls_{n_heads - 1}")] = v
        self.board.add(tagged(scalars), self.step)  # None (MFU without a known peak): not logged

    def _log_reconstructions(self, images: torch.Tensor) -> None:
        """Four samples beside what each decoder makes of them: the first batch's, kept, so that
        stepping through the image card shows the same pictures getting sharper."""
        if self.shown is None:
            self.shown = images[:4].detach().clone()
        decoded = self.backend.reconstructions(self.shown)  # collective under ZeRO-3
        if decoded:
            grid = reconstruction_grid(self.loss_fn.unnormalize(self.shown), decoded)
            self.board.image(RECONSTRUCTIONS, grid, self.step)

    # ---- evaluation, checkpoints, the end ------------------------------------------------

    def validate(self, tag: str) -> Dict[str, float]:
        self.settle()  # the EMA of every step so far
        beat = lambda: self.watchdog.beat(self.step, f"evaluate ({tag})")  # noqa: E731
        res = {"": evaluate(self.backend, self.val_stream, self.device, beat)}
        if self.ema is not None and self.cfg.train.ema_eval:
            with self.ema.applied():
                res["_ema"] = evaluate(self.backend, self.val_stream, self.device, beat)
        scalars = {}
        for suffix, r in res.items():
            for k in ("top1", "top5", "loss"):
                scalars[f"val{suffix}/{k}"] = r[k]
        self.board.add(tagged(scalars), self.step)  # top-1 on the first screen, the rest in 2_val
        self.say(f"{tag}: " + "  ".join(f"{k} {v:.2f}" for k, v in scalars.items()))
        if self.info.is_main:  # every evaluation of the run, for scripts (a resumed run appends)
            with open(self.out_dir / "val_log.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "tag": tag, **scalars}) + "\n")
        return scalars

    def save(self) -> Optional[Path]:
        """A resumable checkpoint of every rank, with its layout-free form unless switched off;
        None where it failed and train.on_save_error is "continue"."""
        self.settle()  # the skip count and EMA of every step so far
        self.watchdog.beat(self.step, "save")
        client = {"step": self.step, "data": self.train_stream.state_dict(), "rng": rng_state(),
                  "nan_skipped": self.nan_skipped}
        if self.ema is not None:
            client["ema"] = self.ema.state_dict()
        also = None
        if self.cfg.train.portable_checkpoint:
            also = lambda tmp: write_portable(tmp / PORTABLE, self.backend, self.ema, self._position())  # noqa: E731
        with _file_size_limit(self.step):
            saved = self.ckpts.save(self.backend, self.step, client, {**self.meta, "layout": self.layout}, also)
        self.watchdog.beat(self.step, "train")
        return saved

    def _position(self) -> dict:
        """The run's place, for the layout-free form."""
        return {"step": self.step, "data": self.train_stream.global_position(), "seed": self.cfg.train.seed,
                "nan_skipped": self.nan_skipped, "model": self.meta, "layout": self.layout,
                "pipeline": self._pipeline_state()}

    def convert(self, where: Path) -> Path:
        """Add the layout-free form to a checkpoint written without it, on the layout that wrote
        it: each rank loads its own share (as in a resume) and writes it, so no rank holds more
        than the run did. Returns the new folder."""
        where = Path(where)
        self.ckpts.check_intact(where)
        marker = read_marker(where)
        written = marker.get("layout") or {"backend": "its layout", "world_size": marker["world_size"]}
        if written != self.layout and (marker.get("layout") or written["world_size"] != self.info.world_size):
            raise ConfigError(f"{where} was written by {written['backend']} on {written['world_size']} ranks; this "
                              f"is {self.backend.name} on {self.info.world_size}: convert it on the layout that "
                              f"wrote it (its launcher, world size and --deepspeed_config)")
        self._check_model(where)
        self._resume_native(where)
        self.ckpts.add_folder(where, PORTABLE, lambda folder: write_portable(folder, self.backend, self.ema,
                                                                            self._position()))
        return where / PORTABLE

    @property
    def layout(self) -> dict:
        """What a native checkpoint is tied to; any other layout resumes from the portable form."""
        return {"backend": self.backend.name, "world_size": self.info.world_size}

    def _pipeline_state(self) -> Optional[dict]:
        engine = getattr(self.backend, "engine", None)
        if not hasattr(engine, "zero_stash"):
            return None
        return {"zero_stash": engine.zero_stash, "steps": engine.steps, "drift": engine.last_drift}

    def resume(self, resume: Optional[str]) -> None:
        """``resume``: "auto" (the newest complete checkpoint, if any), a folder, or None."""
        if not resume:
            return
        self.watchdog.beat(self.step, "resume")
        if resume == "auto":  # the newest checkpoint whose files verify (the damaged are named)
            where = self.ckpts.latest_intact()
            if where is None:
                self.say(f"no intact checkpoint under {self.ckpts.root}: starting from scratch")
                return
        else:
            where = Path(resume)
            self.ckpts.check_intact(where)  # one-line errors: not a complete checkpoint, or damaged
        saved = self._check_model(where)
        written = saved.get("layout", {"backend": None, "world_size": saved["world_size"]})
        if written == self.layout or (written["backend"] is None and written["world_size"] == self.info.world_size):
            self._resume_native(where)
        else:
            self._resume_portable(where, written)

    def _check_model(self, where: Path) -> dict:
        """The checkpoint's marker, if it is of the model this run builds (else a one-line error)."""
        saved = read_marker(where)
        mismatch = {k: (saved.get(k), v) for k, v in self.meta.items() if saved.get(k) != v}
        if mismatch:
            raise ConfigError(f"{where} is a checkpoint of {saved.get('model')} "
                              f"({', '.join(f'{k}={a}' for k, (a, _) in mismatch.items())}), but this run builds "
                              f"{self.cfg.model.name} ({', '.join(f'{k}={b}' for k, (_, b) in mismatch.items())})")
        return saved

    def _resume_native(self, where: Path) -> None:
        self.backend.load(where)
        client = self.ckpts.load_client(where)
        self.step, self.nan_skipped = client["step"], client.get("nan_skipped", 0)
        self.train_stream.load_state_dict(client["data"])
        set_rng_state(client["rng"])
        if self.ema is not None:
            if "ema" not in client:
                raise ConfigError(f"{where} holds no EMA but train.ema_decay={self.cfg.train.ema_decay}: "
                                  f"resume with train.ema_decay=0 or start a new run")
            self.ema.load_state_dict(client["ema"])
        self.say(f"resumed from {where} at step {self.step}")

    def _resume_portable(self, where: Path, written: dict) -> None:
        """Another layout: from the layout-free form, each rank reading what it holds."""
        folder = portable_folder(where)
        was = f"{written['backend'] or 'a layout'} on {written['world_size']} ranks"
        if folder is None:
            raise ConfigError(f"{where} was written by {was} and has no layout-free form to resume on "
                              f"{self.backend.name} x{self.info.world_size}: resume on that layout, or convert "
                              f"it there with launchers/convert_checkpoint.py")
        try:
            meta = load_portable(folder, self.backend, self.ema)
            self.train_stream.load_global_position(meta["data"], self.cfg.train.allow_batch_change)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        self.step, self.nan_skipped = meta["step"], meta.get("nan_skipped", 0)
        if meta["data"]["global_batch"] != self.cfg.train.batch_size:  # counted in this run's steps
            order = self.train_stream.order
            self.step = order.epoch * self.steps_per_epoch + order.batches_done
        engine = getattr(self.backend, "engine", None)
        if hasattr(engine, "zero_stash"):
            pipe = meta.get("pipeline") or {}
            engine.steps = pipe.get("steps", self.step)
            engine.zero_stash = pipe.get("zero_stash", engine.zero_stash)
            engine.last_drift = pipe.get("drift")
        self.say(f"resumed from {where} at step {self.step} (written by {was}; its layout-free form, on "
                 f"{self.backend.name} x{self.info.world_size})")

    def export(self, checkpoint: Path) -> Path:
        """fp32 weights (and their EMA) in the authors' released format, written by rank 0."""
        official = self.backend.official_state_dict(checkpoint)
        ema = self.backend.export_ema(self.ema) if self.ema is not None else None
        path = self.out_dir / "model_official.pth"
        if self.info.is_main:
            payload = {"model": official, "config": self.cfg.to_dict(), "step": self.step}
            if ema is not None:
                payload["state_dict_ema"] = rename_to_official(ema, self.model.config.inter_supv)
            atomic_save(payload, path)
        return path

    def _finish(self, elapsed: float) -> Dict[str, float]:
        last = self.save()
        self.ckpts.wait()  # an asynchronous final checkpoint is on disk before the export reads it
        export = self.export(last)
        val = self.validate("final")
        peak = int(comm.all_reduce(torch.tensor([peak_memory_bytes(self.device)], dtype=torch.int64), "max"))
        metrics = {"val_top1": val["val/top1"], "val_top5": val["val/top5"], "train_loss": self.last_loss,
                   "images_per_sec": self.images_seen / max(elapsed, 1e-9), "peak_mem_bytes": int(peak),
                   "steps": self.step, "nan_skipped": self.nan_skipped, "backend": self.backend.name,
                   "world_size": self.info.world_size, "elapsed_s": elapsed,
                   "optimizer_state_bytes": comm.all_gather_object(self.backend.optimizer_state_bytes())}
        if "val_ema/top1" in val:
            metrics["val_ema_top1"], metrics["val_ema_top5"] = val["val_ema/top1"], val["val_ema/top5"]
        self.board.close()
        if self.info.is_main:
            (self.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            self._summary(metrics, last, export)
        comm.barrier()
        return metrics

    def _summary(self, metrics: dict, checkpoint: Path, export: Path) -> None:
        rows = {"val top-1 / top-5": f"{metrics['val_top1']:.2f}% / {metrics['val_top5']:.2f}%"}
        if "val_ema_top1" in metrics:
            rows["EMA val top-1 / top-5"] = f"{metrics['val_ema_top1']:.2f}% / {metrics['val_ema_top5']:.2f}%"
        rows.update({"final train loss": f"{self.last_loss:.4f}",
                     "steps (skipped)": f"{self.step} ({self.nan_skipped})",
                     "throughput": f"{metrics['images_per_sec']:.1f} img/s ({self.backend.name}, "
                                   f"{self.info.world_size} ranks)",
                     "time": f"{metrics['elapsed_s']:.0f} s",
                     "peak memory / rank": f"{metrics['peak_mem_bytes'] / 2**20:.0f} MiB",
                     "checkpoint (resume)": str(checkpoint), "weights (released format)": str(export),
                     "metrics": str(self.out_dir / "metrics.json")})
        if self.board.log_dir is not None and self.cfg.monitor.tensorboard:
            exe = Path(sys.executable).parent / "tensorboard"  # the venv's, where there is one
            rows["TensorBoard"] = f"{exe if exe.is_file() else 'tensorboard'} --logdir {self.out_dir / 'tensorboard'}"
        self.console.summary(f"{self.cfg.model.name} on {self.cfg.data.dataset}", rows)


def train(cfg: Config, ds_config: Optional[str] = None, resume: Optional[str] = None,
          log: Optional[Callable[[str], None]] = None) -> Dict[str, float]:
    """Build a Trainer, resume it if asked, train; returns the final metrics. The process is left
    as a fresh one would be for what runs next in it (ZeRO-3's replacement of F.linear undone)."""
    try:
        trainer = Trainer(cfg, ds_config, log)
        trainer.resume(resume)
        return trainer.train()
    finally:
        restore_functional_linear()
