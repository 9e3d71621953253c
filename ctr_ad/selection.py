"""Per-component best-step selection: each component keeps the weights of its own best evaluation.

With ``train.best_step_selection: ensemble`` all K components of a run stop at the step where the
*ensemble's* validation logloss was best, so one replica that keeps epoch 2 while another keeps
epoch 3 moves all its components at once — run-to-run noise shared by the components, which averaging
them cannot cancel (PD² ≈ σ²(1 + (K−1)ρ)/K grows with that shared ρ). ``per_component`` lets each
component keep the evaluation with its own best validation logloss, so the choices are independent
between components. Whether that helps depends on the validation split resolving an epoch per
component (on a few hundred validation rows it does not: docs/experiments.md).
"""

from __future__ import annotations

import math

from torch import Tensor

from ctr_ad.model import EnsembleCTR


def improved_components(component_logloss: list[float], best: list[float]) -> list[int]:
    """The components whose validation logloss beats their best so far (a NaN never does)."""
    return [
        k for k, (now, was) in enumerate(zip(component_logloss, best, strict=True)) if not math.isnan(now) and now < was
    ]


def keep_components(model: EnsembleCTR, kept: dict[str, Tensor] | None, components: list[int]) -> dict[str, Tensor]:
    """Copy ``components``' parts of ``model``'s current state into ``kept`` (a CPU copy of a state_dict;
    None: the first selection, which copies the whole state). Entries the components share (the frozen
    anchor) are taken whole. Returns ``kept``."""
    state = model.state_dict()
    if kept is None:
        return {name: t.detach().cpu().clone() for name, t in state.items()}
    for name, tensor in state.items():
        if model.component_part(name, tensor, 0) is None:
            kept[name].copy_(tensor.detach())
            continue
        for k in components:
            target = model.component_part(name, kept[name], k)
            assert target is not None
            target.copy_(model.component_part(name, tensor.detach(), k))
    return kept
