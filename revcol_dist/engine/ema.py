"""Exponential moving average of the weights, correct under ZeRO-3.

Each rank averages only what it owns: the full parameter in a single process, under DDP and
ZeRO-1/2 (where every rank holds all weights), and its own flat partition (``ds_tensor``) under
ZeRO-3, so the EMA is sharded exactly like the parameters and never gathered to update. For
evaluation and export the EMA values are swapped into those same tensors; ZeRO-3 then gathers
them like ordinary weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List

import torch


def _owned(p: torch.nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


class ModelEMA:
    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.names: List[str] = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        # fp32 shadows whatever the live dtype (a 0.9999 average is meaningless in bf16)
        self.shadow = [_owned(p).detach().float().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        live = [_owned(p) for p in self.params]  # no detach: under no_grad one op for all of them
        live = [t if t.dtype == torch.float32 else t.float() for t in live]
        torch._foreach_lerp_(self.shadow, live, 1.0 - self.decay)  # s += (1-d)(p - s) = d s + (1-d) p
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def applied(self):
        """Within the block the model's parameters hold the EMA weights (collective under ZeRO-3)."""
        # ZeRO-3 keeps small ("persistent") parameters whole on every rank besides their partition:
        # those are set whole, from the gathered EMA
        whole = [i for i, p in enumerate(self.params) if getattr(p, "ds_persist", False)]
        backup = [_owned(p).detach().clone() for p in self.params]
        backup_whole = {i: self.params[i].data.clone() for i in whole}
        for p, s in zip(self.params, self.shadow):
            _owned(p).data.copy_(s)
        for i in whole:
            self.params[i].data.copy_(self._gather(i))
        try:
            yield
        finally:
            for p, b in zip(self.params, backup):
                _owned(p).data.copy_(b)
            for i, b in backup_whole.items():
                self.params[i].data.copy_(b)

    def full(self, i: int) -> torch.Tensor:
        """Parameter i's whole fp32 EMA (collective under ZeRO-3)."""
        return self._gather(i)

    def _gather(self, i: int) -> torch.Tensor:
        p, s = self.params[i], self.shadow[i]
        if not hasattr(p, "ds_tensor"):
            return s
        from ..parallel import comm

        return torch.cat(comm.all_gather(s))[: p.ds_numel].view(p.ds_shape)

    @torch.no_grad()
    def full_state_dict(self, is_main: bool) -> Dict[str, torch.Tensor]:
        """The whole fp32 EMA under the model's own key names, on the main rank (collective under
        ZeRO-3: each parameter's partitions are all-gathered, one parameter at a time)."""
        out: Dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.names):
            full = self._gather(i)
            if is_main:
                out[name] = full.detach().cpu().clone()
        return out

    def state_dict(self) -> Dict:
        return {"decay": self.decay, "updates": self.updates, "names": list(self.names),
                "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: Dict) -> None:
        if list(state["names"]) != self.names or len(state["shadow"]) != len(self.shadow):
            raise ValueError("the EMA in this checkpoint belongs to a different model")
        for s, t in zip(self.shadow, state["shadow"]):
            if s.shape != t.shape:
                raise ValueError(f"EMA shard of shape {tuple(t.shape)} where {tuple(s.shape)} was expected: "
                                 f"resume with the same world size and ZeRO stage")
            s.copy_(t)
        self.updates = state["updates"]
