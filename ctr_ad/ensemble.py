"""``Ensemble``: K copies of any user-defined CTR module, trained as one module.

The factory is called K times, component k under its own seed (:func:`component_seed`), so the
components start apart and an ensemble built twice with one seed starts identically. Their weights
are stacked into one tensor per parameter ([K, *shape], ``torch.func.stack_module_state``) and the
forward evaluates every component with ``torch.func.functional_call``:

* ``vmap`` over the K stacked weights — one batched computation — when the module allows it;
* a plain loop over components otherwise (a module whose forward vmap cannot trace: in-place
  updates of buffers such as BatchNorm's running statistics, data-dependent Python control flow, …).

``vectorize="auto"`` tries vmap on the first forward and falls back to the loop for good if it
fails. Either way the parameters are the same stacked tensors, so an optimizer built before the
first forward stays valid, and a component sees exactly the gradient it would see alone.

The output is the components' logits [K, B] (a module may return [B] or [B, 1]); with a frozen
``anchor`` (:class:`ctr_ad.anchor.LinearAnchor`) each component learns a residual on top of it.
Pair it with :func:`ctr_ad.losses.summed_bce`, a penalty from :mod:`ctr_ad.penalties`,
:class:`ctr_ad.averaging.WeightAverager` and :func:`ctr_ad.model.ensemble_probability`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

logger = logging.getLogger(__name__)

Vectorize = Literal["auto", "vmap", "loop"]


def component_seed(seed: int, k: int) -> int:
    """The seed component ``k`` of an ensemble seeded ``seed`` is built under (a separate model built
    under ``torch.manual_seed(component_seed(seed, k))`` starts with the same weights)."""
    from ctr_ad.data import derive_seed

    return derive_seed(seed, k, 17)


def _mangle(name: str) -> str:
    return name.replace(".", "__")


class Ensemble(nn.Module):
    """K components made by ``factory()``, evaluated together; ``forward`` returns logits [K, B]."""

    def __init__(
        self,
        factory: Callable[[], nn.Module],
        components: int,
        *,
        seed: int = 0,
        anchor: nn.Module | None = None,
        vectorize: Vectorize = "auto",
    ) -> None:
        super().__init__()
        if components < 1:
            raise ValueError("components must be >= 1")
        if vectorize not in ("auto", "vmap", "loop"):
            raise ValueError(f"vectorize {vectorize!r}: choose 'auto', 'vmap' or 'loop'")
        self.components = int(components)
        self.seed = int(seed)
        models = []
        for k in range(self.components):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(component_seed(self.seed, k))
                models.append(factory())
        shapes = {n: tuple(p.shape) for n, p in models[0].named_parameters()}
        for k, m in enumerate(models[1:], 1):
            if {n: tuple(p.shape) for n, p in m.named_parameters()} != shapes:
                raise ValueError(f"factory() built component {k} with other parameters than component 0")
        params, buffers = stack_module_state(models)
        self._param_names = list(params)
        self._buffer_names = list(buffers)
        # The stacked tensors live in one plain submodule, so .to(), state_dict() and optimizers see them.
        self.stacked = nn.Module()
        for name, value in params.items():
            self.stacked.register_parameter(_mangle(name), nn.Parameter(value.detach().clone()))
        for name, value in buffers.items():
            self.stacked.register_buffer(_mangle(name), value.detach().clone())
        # The skeleton functional_call runs with each component's weights: no storage of its own, and
        # kept out of the module tree (a list) so it adds nothing to parameters() or state_dict().
        self._skeleton = [copy.deepcopy(models[0]).to("meta")]
        self.anchor = anchor
        if anchor is not None:
            for p in anchor.parameters():
                p.requires_grad_(False)
        self.requested = vectorize
        #: How the last forward ran: "vmap" or "loop" (None before the first forward).
        self.mode: str | None = None if vectorize == "auto" else vectorize

    # ------------------------------------------------------------------ state
    def stacked_parameters(self) -> dict[str, Tensor]:
        """{name in the user's module: parameter [K, *shape]}."""
        return {n: getattr(self.stacked, _mangle(n)) for n in self._param_names}

    def stacked_buffers(self) -> dict[str, Tensor]:
        return {n: getattr(self.stacked, _mangle(n)) for n in self._buffer_names}

    def train(self, mode: bool = True) -> Ensemble:
        super().train(mode)
        self._skeleton[0].train(mode)
        return self

    def component(self, k: int, factory: Callable[[], nn.Module] | None = None) -> nn.Module:
        """Component ``k`` as a standalone module holding a copy of its current weights (to export,
        serve or inspect it); ``factory`` builds the module, by default a copy of the skeleton."""
        module = factory() if factory is not None else copy.deepcopy(self._skeleton[0]).to_empty(device="cpu")
        with torch.no_grad():
            for name, stacked in self.stacked_parameters().items():
                module.get_parameter(name).copy_(stacked[k])
            for name, stacked in self.stacked_buffers().items():
                module.get_buffer(name).copy_(stacked[k])
        return module.train(self.training)

    # ------------------------------------------------------------------ forward
    def _call_one(self, params: dict[str, Tensor], buffers: dict[str, Tensor], *inputs: Any) -> Tensor:
        out = functional_call(self._skeleton[0], (params, buffers), inputs)
        if out.dim() >= 2 and out.shape[-1] == 1:
            out = out.squeeze(-1)
        return out

    def _vmapped(self, params: dict[str, Tensor], buffers: dict[str, Tensor], inputs: tuple, per_component: bool
                 ) -> Tensor:
        in_dims = (0, 0, *([0 if per_component else None] * len(inputs)))
        return vmap(self._call_one, in_dims=in_dims, randomness="different")(params, buffers, *inputs)

    def _looped(self, params: dict[str, Tensor], buffers: dict[str, Tensor], inputs: tuple, per_component: bool
                ) -> Tensor:
        outs = []
        for k in range(self.components):
            args = tuple(x[k] for x in inputs) if per_component else inputs
            outs.append(self._call_one({n: p[k] for n, p in params.items()},
                                       {n: b[k] for n, b in buffers.items()}, *args))
        return torch.stack(outs)

    def forward(self, *inputs: Any, per_component: bool = False) -> Tensor:
        """Logits [K, B]. Every component sees ``inputs`` (tensors with the batch first), or with
        ``per_component`` its own slice ``x[k]`` of inputs shaped [K, B, ...]."""
        params, buffers = self.stacked_parameters(), self.stacked_buffers()
        if self.mode == "loop":
            logits = self._looped(params, buffers, inputs, per_component)
        elif self.mode == "vmap":
            logits = self._vmapped(params, buffers, inputs, per_component)
        else:
            try:
                logits = self._vmapped(params, buffers, inputs, per_component)
                self.mode = "vmap"
            except Exception as exc:  # vmap cannot trace this module: loop over components from now on
                logger.info(f"Ensemble: {type(self._skeleton[0]).__name__} is not vmappable "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); looping over components")
                self.mode = "loop"
                logits = self._looped(params, buffers, inputs, per_component)
        if self.anchor is not None:
            logits = logits + self.anchor(*inputs).to(logits.dtype)
        return logits
