"""The training loss, with the published intermediate-supervision weights."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

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

    def __call__(self, out, targets: torch.Tensor, images: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(loss, {term name: detached value}); ``targets`` are class indices or soft targets."""
        parts: Dict[str, torch.Tensor] = {}
        total = None
        if out.logits is not None:
            total = F.cross_entropy(out.logits.float(), targets, label_smoothing=self.label_smoothing)
            parts["loss_cls_final"] = total.detach()
        index, n = out.aux_heads()
        if index:
            target = self.reconstruction_target(images)
            for i, logits, rec in zip(index, out.aux_logits, out.reconstructions):
                ce = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
                bce = F.binary_cross_entropy_with_logits(rec.float(), target)
                term = 0.7 * (i + 1) / (n + 1) * ce + 3.0 * (1 - i / n) * bce
                total = term if total is None else total + term
                parts[f"loss_cls_{i}"], parts[f"loss_rec_{i}"] = ce.detach(), bce.detach()
        if total is None:
            raise ValueError("the output holds no head: nothing to compute a loss of")
        return total, parts

    def reconstruction_target(self, images: torch.Tensor) -> torch.Tensor:
        """The decoders' target: the un-normalised image in [0.01, 0.99]."""
        return (images * self._std(images) + self._mean(images)).clamp(0.01, 0.99)

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


def revcol_loss(out, labels: torch.Tensor, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                label_smoothing: float = 0.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``RevColLoss(mean, std, label_smoothing)(out, labels, images)``, for one-off use."""
    return RevColLoss(mean, std, label_smoothing)(out, labels, images)
