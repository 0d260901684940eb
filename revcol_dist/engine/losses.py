"""The training loss, with the published intermediate-supervision weights."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F


def revcol_loss(out, labels: torch.Tensor, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                label_smoothing: float = 0.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """CE on the last head, plus for each earlier head i of n:
    0.7 (i+1)/(n+1) CE(head_i) + 3 (1 - i/n) BCE(decoder_i, image in [0.01, 0.99]).
    With the published four heads: classification 0.175, 0.35, 0.525, 1.0; reconstruction 3, 2, 1."""
    parts: Dict[str, torch.Tensor] = {}
    total = F.cross_entropy(out.logits.float(), labels, label_smoothing=label_smoothing)
    parts["loss_cls_final"] = total.detach()
    n = len(out.aux_logits)
    if n:
        target = reconstruction_target(images, mean, std)
        for i, (a, rec) in enumerate(zip(out.aux_logits, out.reconstructions)):
            loss, ce, bce = aux_loss(i, n, a, rec, labels, target, label_smoothing)
            total = total + loss
            parts[f"loss_cls_{i}"], parts[f"loss_rec_{i}"] = ce.detach(), bce.detach()
    return total, parts


def reconstruction_target(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The decoders' target: the un-normalised image in [0.01, 0.99]."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images * s + m).clamp(0.01, 0.99)


def aux_loss(i: int, n: int, logits: torch.Tensor, rec: torch.Tensor, labels: torch.Tensor, target: torch.Tensor,
             label_smoothing: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head i of n earlier heads: (weighted sum, CE, BCE). A pipeline stage computes the terms
    of the heads it holds with this, so the total is the single-process loss."""
    ce = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    bce = F.binary_cross_entropy_with_logits(rec.float(), target)
    return 0.7 * (i + 1) / (n + 1) * ce + 3.0 * (1 - i / n) * bce, ce, bce
