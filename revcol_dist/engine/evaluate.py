"""Top-1 / top-5 accuracy."""

from __future__ import annotations

from typing import Dict, Iterable

import torch


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    n = top1 = top5 = 0
    loss_sum = 0.0
    for batch in batches:
        images, labels = batch[0], batch[1]
        logits = model(images).logits
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[1])
        pred = logits.topk(k, dim=1).indices
        hit = pred == labels[:, None]
        top1 += hit[:, 0].sum().item()
        top5 += hit.any(dim=1).sum().item()
        n += labels.numel()
    model.train(was_training)
    return {"top1": 100.0 * top1 / max(n, 1), "top5": 100.0 * top5 / max(n, 1), "loss": loss_sum / max(n, 1), "n": n}
