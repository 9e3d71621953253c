"""Weight averaging: an exponential moving average (EMA) of every trainable tensor of the ensemble.

Run-to-run differences of a deep model come largely from where the last few hundred noisy steps left
the weights. Averaging the weights over a horizon of about an epoch cancels much of that noise
(σ² of the retrained predictions falls) at no cost in accuracy, which is why it is the first lever of
the reproducibility recipe. The horizon is given in epochs, not as a per-step decay, so one setting
means the same on 8k rows and on 1M: decay = 1 − 1 / (epochs × steps_per_epoch), with the usual
warm-up min(decay, (1 + t) / (10 + t)) so that early averages are not dominated by the random init.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class WeightAverager:
    """Keeps the EMA of ``model``'s parameters; :meth:`swapped_in` evaluates with it."""

    def __init__(self, model: nn.Module, horizon_epochs: float, steps_per_epoch: int) -> None:
        self.model = model
        self.decay = 1.0 - 1.0 / max(horizon_epochs * steps_per_epoch, 1.0)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.averaged = {n: params[n].detach().clone() for n in self.names}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        t = self.updates
        decay = min(self.decay, (1.0 + t) / (10.0 + t))
        params = dict(self.model.named_parameters())
        torch._foreach_lerp_([self.averaged[n] for n in self.names], [params[n].detach() for n in self.names],
                             1.0 - decay)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own ones again after it."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            saved = {n: params[n].detach().clone() for n in self.names}
            for n in self.names:
                params[n].copy_(self.averaged[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n in self.names:
                    params[n].copy_(saved[n])

    def state_dict(self) -> dict[str, Tensor | int]:
        return {"updates": self.updates, **{f"avg.{n}": t for n, t in self.averaged.items()}}

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        self.updates = int(state["updates"])
        for n in self.names:
            self.averaged[n].copy_(state[f"avg.{n}"])
