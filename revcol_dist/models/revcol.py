"""The RevCol network: stem, reversible columns, classifier heads and decoders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .column import Column
from .config import RevColConfig
from .heads import Classifier, Decoder, SimDecoder
from .layers import Conv2d, LayerNorm2d


@dataclass
class RevColOutput:
    logits: torch.Tensor  # the last column's head, [B, num_classes]
    aux_logits: List[torch.Tensor] = field(default_factory=list)  # earlier heads (training, inter_supv)
    reconstructions: List[torch.Tensor] = field(default_factory=list)  # [B, 3, H, W] each


class RevCol(nn.Module):
    """Module names differ from the released checkpoints only at the top (``columns.i`` for
    ``subnet{i}``, ``heads`` for ``cls``/``cls_blocks``, ``decoders`` for ``decoder_blocks``);
    see ``official.py`` for the mapping."""

    def __init__(self, config: RevColConfig) -> None:
        super().__init__()
        self.config = config
        ch, layers = config.channels, config.layers
        self.stem = nn.Sequential(Conv2d(3, ch[0], kernel_size=4, stride=4), LayerNorm2d(ch[0]))
        rates = config.drop_path_rates()
        self.columns = nn.ModuleList(
            Column(ch, layers, config.kernel_size, i == 0, rates, up2=config.level0_up2)
            for i in range(config.num_columns)
        )
        if config.inter_supv:
            self.heads = nn.ModuleList(Classifier(ch[3], config.num_classes) for _ in config.head_columns)
            n_dec = len(config.head_columns) - 1
            if config.num_classes <= 1000:
                self.decoders = nn.ModuleList(Decoder(ch) for _ in range(n_dec))
            else:
                self.decoders = nn.ModuleList(SimDecoder(ch[3]) for _ in range(n_dec))
        else:
            self.heads = nn.ModuleList([Classifier(ch[3], config.num_classes, config.head_init_scale)])
            self.decoders = nn.ModuleList()
        self.reversible = config.reversible
        from ..reversible import DriftStats, ReversiblePolicy

        self.policy = ReversiblePolicy(
            boundary_interval=config.boundary_interval,
            min_reconstruct_alpha=config.min_reconstruct_alpha,
            offload_boundaries=config.offload_boundaries,
            plain_columns=config.plain_columns,
            recompute=config.recompute,
            lean_blocks=config.lean_blocks,
            keep_levels=config.keep_levels,
            recompute_hidden=config.recompute_hidden,
        )
        self.drift = DriftStats()

    @property
    def num_columns(self) -> int:
        return len(self.columns)

    def _run_columns(self, x: torch.Tensor, taps) -> tuple:
        if self.reversible and torch.is_grad_enabled():
            from ..reversible import run_reversible

            return run_reversible(self.columns, x, taps, self.policy, self.drift)
        state, tapped = None, {}
        for i, col in enumerate(self.columns):
            state = col(x, state)
            if i in taps:
                tapped[i] = state[3]
        return state, tapped

    def _stem(self, images: torch.Tensor) -> torch.Tensor:
        """Under the reversible engine the stem is recomputed in backward too: its conv output
        (as large as a level-0 map) is otherwise kept for the LayerNorm's backward."""
        if self.reversible and self.config.checkpoint_heads and torch.is_grad_enabled():
            return _checkpoint(self.stem, images)
        return self.stem(images)

    def forward_features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """The last column's four maps (strides 4, 8, 16, 32), for detection/segmentation necks."""
        self._check_input(images)
        state, _ = self._run_columns(self._stem(images), ())
        return state

    def forward(self, images: torch.Tensor) -> RevColOutput:
        self._check_input(images)
        cfg = self.config
        supervise = cfg.inter_supv and self.training
        head_cols = cfg.head_columns if supervise else ()
        state, tapped = self._run_columns(self._stem(images), head_cols)
        logits = self.heads[-1](state[3])
        if not supervise:
            return RevColOutput(logits)
        aux, recs = [], []
        for h, col in enumerate(head_cols[:-1]):
            a, r = self.aux_outputs(h, tapped[col], state, images.shape[-2:])
            aux.append(a)
            recs.append(r)
        return RevColOutput(logits, aux, recs)

    def aux_outputs(self, h: int, c3: torch.Tensor, state, image_size):
        """Intermediate head h on its column's c3: (logits, reconstruction). ``state`` is any
        column's four maps (for the decoder's sizes). Recomputed in backward when
        ``checkpoint_heads`` is on."""
        sizes = [state[2].shape[-2:], state[1].shape[-2:], state[0].shape[-2:]]
        recompute = self.config.checkpoint_heads and torch.is_grad_enabled()
        dec = self.decoders[h]
        if recompute and isinstance(dec, Decoder):
            # Recomputed one stage at a time: only one stage's graph is alive in backward.
            return (_maybe_checkpoint(self.heads[h], recompute, c3),
                    _checkpoint(_staged_decoder, dec, c3, sizes, image_size))
        return (_maybe_checkpoint(self.heads[h], recompute, c3),
                _maybe_checkpoint(dec, recompute, c3, sizes, image_size))

    def _check_input(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"RevCol expects images of shape [B, 3, H, W], got {tuple(images.shape)}")
        if min(images.shape[-2:]) < 32:
            raise ValueError(
                f"RevCol needs H and W >= 32 (four stride-2 stages after a stride-4 stem), got {tuple(images.shape[-2:])}"
            )


def _checkpoint(fn, *args):
    # Heads, decoders and the stem draw no random numbers; non-reentrant checkpoint keeps
    # gradients ordinary (and nests).
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def _maybe_checkpoint(module: nn.Module, recompute: bool, *args):
    return _checkpoint(module, *args) if recompute else module(*args)


def _staged_decoder(dec: Decoder, c3: torch.Tensor, sizes, image_size) -> torch.Tensor:
    x = c3
    for i, size in enumerate(sizes):
        x = _checkpoint(dec.stage, i, x, size)
    return _checkpoint(dec.output, x, image_size)
