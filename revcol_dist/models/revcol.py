"""The RevCol network: stem, reversible columns, classifier heads and decoders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..reversible import DriftStats, run_reversible
from ..reversible.coupling import column_alphas
from .column import Column
from .config import RevColConfig
from .heads import Classifier, Decoder, SimDecoder
from .layers import Conv2d, LayerNorm2d, name_random_streams


@dataclass
class RevColOutput:
    """What the heads give. A pipeline stage's output holds only the heads it owns: ``logits``
    is None where the final head is on another stage, and ``aux_index`` says which of the
    ``num_aux`` earlier heads ``aux_logits``/``reconstructions`` come from."""

    logits: Optional[torch.Tensor]  # the last column's head, [B, num_classes]
    aux_logits: List[torch.Tensor] = field(default_factory=list)  # earlier heads (training, inter_supv)
    reconstructions: List[torch.Tensor] = field(default_factory=list)  # [B, 3, H, W] each
    aux_index: Optional[Sequence[int]] = None  # None: 0, 1, ... (every earlier head)
    num_aux: Optional[int] = None  # None: len(aux_logits)

    def aux_heads(self) -> Tuple[Sequence[int], int]:
        """(index of each earlier head present, number of earlier heads in the model)."""
        index = range(len(self.aux_logits)) if self.aux_index is None else self.aux_index
        return index, len(self.aux_logits) if self.num_aux is None else self.num_aux


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
        self.policy = config.policy()
        # How blocks run outside the reversible engine (evaluation, model.reversible=False):
        # None is each block's own forward; an execution engine may set one runner per level
        # (``Column.forward``'s run_block), e.g. the compiled lean blocks (parallel/compile.py).
        self.block_runner = None
        name_random_streams(self)
        self.drift = DriftStats()

    @property
    def num_columns(self) -> int:
        return len(self.columns)

    # ---- the forward in slices: a pipeline stage runs some of them -----------------------

    def forward_stem(self, images: torch.Tensor) -> torch.Tensor:
        """Under the reversible engine the stem is recomputed in backward too: its conv output
        (as large as a level-0 map) is otherwise kept for the LayerNorm's backward."""
        self._check_input(images)
        if self.reversible and self.config.checkpoint_heads and torch.is_grad_enabled():
            return _checkpoint(self.stem, images)
        return self.stem(images)

    def forward_columns(self, x: torch.Tensor, start: int = 0, stop: Optional[int] = None,
                        initial: Optional[Sequence[torch.Tensor]] = None, taps: Iterable[int] = (),
                        **engine) -> Tuple[List[torch.Tensor], dict]:
        """Columns ``start..stop-1`` from the stem output ``x`` and the previous column's four
        maps ``initial`` (None before column 0): (the last column's maps, {column: its c3} for
        the columns in ``taps``). ``engine`` goes to the reversible engine (``policy``,
        ``keep_outputs``, ``segment``: a stage exchanging its boundary with its neighbours)."""
        stop = self.num_columns if stop is None else stop
        cols = self.columns[start:stop]
        taps = [c - start for c in taps if start <= c < stop]
        if self.reversible and torch.is_grad_enabled():
            policy = engine.pop("policy", self.policy)
            state, tapped = run_reversible(cols, x, taps, policy, self.drift, initial=initial, **engine)
        else:
            state, tapped = initial, {}
            alphas = column_alphas(cols)  # every column's in one pass, where not partitioned
            for j, col in enumerate(cols):
                state = col(x, state, run_block=self.block_runner, alphas=None if alphas is None else alphas[j])
                if j in taps:
                    tapped[j] = state[3]
        return state, {j + start: t for j, t in tapped.items()}

    def supervised_heads(self) -> Tuple[int, ...]:
        """Heads the forward computes: every head while training with intermediate supervision,
        else the final one. Head h reads column ``config.head_columns[h]``."""
        if self.config.inter_supv and self.training:
            return tuple(range(len(self.config.head_columns)))
        return (len(self.heads) - 1,)

    def forward_heads(self, state: Sequence[torch.Tensor], tapped: dict, image_size,
                      heads: Optional[Iterable[int]] = None) -> RevColOutput:
        """The heads in ``heads`` (default: ``supervised_heads()``) on the maps they read: the
        final classifier on ``state`` (the last column's), earlier head h on ``tapped``."""
        heads = sorted(self.supervised_heads() if heads is None else heads)
        final = len(self.heads) - 1
        logits = self.heads[-1](state[3]) if final in heads else None
        aux = [h for h in heads if h != final]
        if not self.config.inter_supv:
            return RevColOutput(logits)
        outs = [self.aux_outputs(h, tapped[self.config.head_columns[h]], state, image_size) for h in aux]
        return RevColOutput(logits, [a for a, _ in outs], [r for _, r in outs], aux_index=aux,
                            num_aux=len(self.config.head_columns) - 1)

    def forward_features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """The last column's four maps (strides 4, 8, 16, 32), for detection/segmentation necks."""
        state, _ = self.forward_columns(self.forward_stem(images))
        return state

    def forward(self, images: torch.Tensor, heads: Optional[Iterable[int]] = None) -> RevColOutput:
        """``heads``: which heads to compute (default ``supervised_heads()``; ``reconstruct``
        asks for the earlier ones in evaluation mode)."""
        heads = self.supervised_heads() if heads is None else tuple(heads)
        taps = [self.config.head_columns[h] for h in heads if h != len(self.heads) - 1]
        state, tapped = self.forward_columns(self.forward_stem(images), taps=taps)
        return self.forward_heads(state, tapped, images.shape[-2:], heads)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Each decoder's image in [0, 1] (sigmoid of its logits), in evaluation mode (no drop
        path, no random draw): what the intermediate supervision reconstructs, for display."""
        if not self.config.inter_supv:
            return []
        was = self.training
        self.eval()
        try:
            out = self(images, heads=range(len(self.config.head_columns) - 1))
        finally:
            self.train(was)
        return [r.float().sigmoid() for r in out.reconstructions]

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
