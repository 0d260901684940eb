"""The training loss, with the published intermediate-supervision weights."""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


class RevColLoss:
    """CE on the last head, plus for each earlier head i of n:
    0.7 (i+1)/(n+1) CE(head_i) + 3 (1 - i/n) BCE(decoder_i, image in [0.01, 0.99]).
    With the published four heads: classification 0.175, 0.35, 0.525, 1.0; reconstruction 3, 2, 1.

    One object for every backend. Applied to a pipeline stage's output (only the heads that
    stage holds) it gives that stage's share; the shares sum to the whole model's loss."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], label_smoothing: float = 0.0) -> None:
        self.mean, self.std, self.label_smoothing = tuple(mean), tuple(std), label_smoothing
        self._stats: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}
        # the arithmetic, a function of tensors: ``train.compile`` points this at a compiled copy
        # (``parallel/compile.py``), one graph for the forward and one for the backward
        self.eager_terms = partial(loss_terms, label_smoothing=label_smoothing)
        self.terms: Callable = self.eager_terms

    def __call__(self, out, targets: torch.Tensor, images: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(loss, {term name: detached value}); ``targets`` are class indices or soft targets."""
        index, n = out.aux_heads()
        index = tuple(index)[:min(len(out.aux_logits), len(out.reconstructions))]
        if out.logits is None and not index:
            raise ValueError("the output holds no head: nothing to compute a loss of")
        mean, std = self._on(images) if index else (None, None)
        total, final, ces, bces = self.terms(out.logits, tuple(out.aux_logits), tuple(out.reconstructions),
                                             targets, images, mean, std, index, n)
        parts: Dict[str, torch.Tensor] = {}
        if final is not None:
            parts["loss_cls_final"] = final
        for i, ce, bce in zip(index, ces, bces):
            parts[f"loss_cls_{i}"], parts[f"loss_rec_{i}"] = ce, bce
        return total, parts

    def unnormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], for display."""
        return (images * self._std(images) + self._mean(images)).clamp(0.0, 1.0)

    def _mean(self, images):
        return self._on(images)[0]

    def _std(self, images):
        return self._on(images)[1]

    def _on(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """mean/std as [1, 3, 1, 1] tensors where the images are, made once per device."""
        key = images.device
        if key not in self._stats:
            self._stats[key] = tuple(torch.tensor(v, device=key).view(1, 3, 1, 1) for v in (self.mean, self.std))
        return self._stats[key]


def loss_terms(logits: Optional[torch.Tensor], aux_logits: Tuple[torch.Tensor, ...],
               reconstructions: Tuple[torch.Tensor, ...], targets: torch.Tensor, images: torch.Tensor,
               mean: Optional[torch.Tensor], std: Optional[torch.Tensor], index: Tuple[int, ...], n: int,
               label_smoothing: float = 0.0):
    """(total, final head's CE or None, (CE of each earlier head), (BCE of each decoder)) in fp32,
    the terms detached: ``RevColLoss``'s arithmetic, with no Python state, so that it compiles as
    one graph (whose backward then takes the total's gradient alone, not zeros for each term)."""
    total = final = None
    if logits is not None:
        total = final = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
    ces, bces = [], []
    if index:
        target = (images * std + mean).clamp(0.01, 0.99)  # the un-normalised image in [0.01, 0.99]
        for i, logits_i, rec in zip(index, aux_logits, reconstructions):
            ce = F.cross_entropy(logits_i.float(), targets, label_smoothing=label_smoothing)
            bce = F.binary_cross_entropy_with_logits(rec.float(), target)
            term = 0.7 * (i + 1) / (n + 1) * ce + 3.0 * (1 - i / n) * bce
            total = term if total is None else total + term
            ces.append(ce)
            bces.append(bce)
    detached = lambda ts: tuple(t.detach() for t in ts)  # noqa: E731
    return total, None if final is None else final.detach(), detached(ces), detached(bces)


def revcol_loss(out, labels: torch.Tensor, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                label_smoothing: float = 0.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``RevColLoss(mean, std, label_smoothing)(out, labels, images)``, for one-off use."""
    return RevColLoss(mean, std, label_smoothing)(out, labels, images)
