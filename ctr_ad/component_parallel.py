"""Component parallelism: under ``torchrun`` each rank owns whole components of the ensemble.

The K components of :class:`~ctr_ad.model.EnsembleCTR` are independent models: their embedding rows
and MLP weights never meet in the BCE loss. With ``train.parallelism: component`` the world is cut
into G = gcd(K, world) *component groups*; group g owns components ``g·K/G .. (g+1)·K/G − 1`` and each
of its world/G ranks holds a :class:`EnsembleCTR` of just those components (every parameter of the
model is component-major along dim 0, so a component's slice is a block of rows). Then

* **no gradient crosses groups**: the BCE of a component depends on its own weights only;
* **the anti-distillation penalty** needs the logits of every component on the rows they all see:
  one all-gather of [K/G, P] logits per step (:meth:`ComponentShards.gather_logits`). The gathered
  pieces of other groups are constants here and this rank's own piece is put back *in place*, so the
  penalty computed identically on every rank sends each rank exactly ∂penalty/∂(own logits) and no
  collective runs in backward. (``torch.distributed.nn.functional.all_gather`` would instead sum the
  gradients of every rank in backward — world × the true gradient when every rank computes the
  same penalty — and pay a reduce-scatter per step.);
* **inside a group** (world > K, or world not dividing K) the ranks are data-parallel: each takes its
  shard of the group's batch and :meth:`ComponentShards.sync_gradients` averages the gradients over
  the group, sparse embedding gradients included (their rows are all-gathered), so SparseAdam stays
  sparse — unlike DDP, which needs dense gradients;
* **evaluation, averaging, checkpoints and the bundle** see the whole ensemble: logits and weights are
  all-gathered in component order, so a checkpoint or bundle is byte-for-byte the format (and within
  float tolerance the content) of a single-process run's, and a run can resume under another world.

A rank's components see exactly the data of the single-process run: the plan draws the orders of
components ``first .. first + count − 1`` (see ``PlanSpec.first_component``), and the initial weights
are drawn for the full ensemble (one generator, components one after another) before each rank keeps
its slice. Dropout masks are drawn per rank, so with ``model.dropout > 0`` the runs agree in
distribution only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ctr_ad.errors import UserError


@dataclass(frozen=True)
class ComponentLayout:
    """Which components and which data shard rank ``rank`` of ``world`` owns for K = ``components``."""

    components: int
    world: int
    rank: int

    @property
    def groups(self) -> int:
        return math.gcd(self.components, self.world)

    @property
    def group_size(self) -> int:
        return self.world // self.groups

    @property
    def group(self) -> int:
        return self.rank // self.group_size

    @property
    def group_rank(self) -> int:
        return self.rank % self.group_size

    @property
    def count(self) -> int:
        """Components per group (this rank's K)."""
        return self.components // self.groups

    @property
    def first(self) -> int:
        return self.group * self.count

    def describe(self) -> str:
        return (
            f"component parallelism: {self.groups} group(s) of {self.group_size} rank(s), "
            f"{self.count} component(s) each; rank {self.rank} owns components "
            f"{self.first}..{self.first + self.count - 1}"
        )


def layout_for(components: int, world: int, rank: int) -> ComponentLayout:
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"component parallelism: rank {rank} outside a world of {world}")
    return ComponentLayout(components, world, rank)


def join_component_group(layout: ComponentLayout) -> Any:
    """The process group of this rank's component group (None with one rank per group).

    ``new_group`` is collective: every rank creates every group, in the same order."""
    if layout.group_size == 1:
        return None
    mine = None
    for g in range(layout.groups):
        pg = dist.new_group(list(range(g * layout.group_size, (g + 1) * layout.group_size)))
        if g == layout.group:
            mine = pg
    return mine


class ComponentShards:
    """The collectives of one component-parallel rank (the process group must be initialised)."""

    def __init__(
        self, layout: ComponentLayout, device: torch.device, param_names: Iterable[str], group: Any = None
    ) -> None:
        """``group``: this rank's component group (:func:`join_component_group`); needed only when
        the group has more than one rank."""
        self.layout = layout
        self.device = device
        #: State keys that are split by component (every model parameter); other keys (the frozen
        #: anchor's buffers) are the same on every rank.
        self.param_names = frozenset(param_names)
        self.group_pg = group

    # ---- weights and optimizer state: full ensemble <-> this rank's slice
    def _rows(self, full_rows: int) -> slice:
        k = self.layout.components
        if full_rows % k:
            raise UserError(f"component parallelism: a tensor of {full_rows} rows is not split by K={k} components")
        per = full_rows // k
        return slice(self.layout.first * per, (self.layout.first + self.layout.count) * per)

    def slice_tensor(self, full: Tensor) -> Tensor:
        return full[self._rows(full.shape[0])].clone()

    def gather_tensor(self, local: Tensor) -> Tensor:
        """The full-ensemble tensor from every group's slice (component order), on local's device."""
        lay = self.layout
        x = local.detach().to(self.device).contiguous()
        parts = [torch.empty_like(x) for _ in range(lay.world)]
        dist.all_gather(parts, x)
        return torch.cat([parts[g * lay.group_size] for g in range(lay.groups)]).to(local.device)

    def slice_state(self, full: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: self.slice_tensor(v) if k in self.param_names else v for k, v in full.items()}

    def gather_state(self, local: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: self.gather_tensor(v) if k in self.param_names else v for k, v in local.items()}

    def slice_averager(self, full: dict[str, Any]) -> dict[str, Any]:
        return {k: self.slice_tensor(v) if k.startswith("avg.") else v for k, v in full.items()}

    def gather_averager(self, local: dict[str, Any]) -> dict[str, Any]:
        return {k: self.gather_tensor(v) if k.startswith("avg.") else v for k, v in local.items()}

    def slice_optimizer(self, full: dict[str, Any]) -> dict[str, Any]:
        """An optimizer state_dict of the full ensemble cut to this rank: per-parameter tensors
        (Adam moments, shaped like their parameter) by component rows; step counts as they are."""
        state = {
            i: {n: self.slice_tensor(v) if _per_row(v) else v for n, v in s.items()} for i, s in full["state"].items()
        }
        return {**full, "state": state}

    def gather_optimizer(self, local: dict[str, Any]) -> dict[str, Any]:
        state = {}
        for i in sorted(local["state"]):  # the same order on every rank: collectives pair up
            s = local["state"][i]
            state[i] = {n: self.gather_tensor(s[n]) if _per_row(s[n]) else s[n] for n in sorted(s)}
        return {**local, "state": state}

    def gather_logits_array(self, local: Tensor) -> Tensor:
        """Evaluation logits [K, N] from this group's [K/G, N] (every rank scores the whole split)."""
        return self.gather_tensor(local)

    # ---- one training step
    def gather_logits(self, local: Tensor) -> Tensor:
        """Logits [K, P] of every component on the shared rows, from this rank's [K/G, P/S] piece
        (S = group size: the group's ranks hold contiguous shards of the rows, in rank order).

        Only ``local`` stays in the autograd graph, in its place: see the module docstring.
        """
        lay = self.layout
        x = local.detach().contiguous()
        if lay.group_size > 1:
            # Shards may differ by a row (tensor_split): gather the sizes, pad to the largest.
            size = torch.tensor([x.shape[1]], device=x.device)
            sizes = [torch.empty_like(size) for _ in range(lay.world)]
            dist.all_gather(sizes, size)
            widths = [int(s) for s in sizes]
            x = nn.functional.pad(x, (0, max(widths) - x.shape[1]))
        else:
            widths = [x.shape[1]] * lay.world
        parts = [torch.empty_like(x) for _ in range(lay.world)]
        dist.all_gather(parts, x)
        pieces = [p[:, :w] for p, w in zip(parts, widths, strict=True)]
        pieces[lay.rank] = local
        per_group = [torch.cat(pieces[g * lay.group_size : (g + 1) * lay.group_size], dim=1) for g in range(lay.groups)]
        return torch.cat(per_group, dim=0)

    def sum_over_components(self, value: Tensor) -> Tensor:
        """Σ over every component of a per-rank sum: all-reduce, then ÷ group size (the ranks of a
        group hold synchronised copies, or shards whose sum the caller pre-scaled)."""
        out = value.detach().clone()
        dist.all_reduce(out)
        return out / self.layout.group_size

    def sync_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Average the gradients over this rank's group (no-op with one rank per group).

        Dense gradients: an all-reduce. Sparse embedding gradients: every rank's (indices, values)
        are all-gathered and concatenated, so the optimizer sees the rows the whole group's batch
        touched — what a single process would see for that batch."""
        size = self.layout.group_size
        if size == 1:
            return
        for p in params:
            g = p.grad
            if g is None:
                continue
            if not g.is_sparse:
                dist.all_reduce(g, group=self.group_pg)
                g.div_(size)
                continue
            g = g.coalesce()
            idx, val = g.indices(), g.values()
            n = torch.tensor([idx.shape[1]], device=idx.device)
            counts = [torch.empty_like(n) for _ in range(size)]
            dist.all_gather(counts, n, group=self.group_pg)
            top = max(int(c) for c in counts)
            idx_pad = nn.functional.pad(idx, (0, top - idx.shape[1]))
            val_pad = nn.functional.pad(val, (0, 0, 0, top - val.shape[0]))
            all_idx = [torch.empty_like(idx_pad) for _ in range(size)]
            all_val = [torch.empty_like(val_pad) for _ in range(size)]
            dist.all_gather(all_idx, idx_pad, group=self.group_pg)
            dist.all_gather(all_val, val_pad, group=self.group_pg)
            idx = torch.cat([t[:, : int(c)] for t, c in zip(all_idx, counts, strict=True)], dim=1)
            val = torch.cat([t[: int(c)] for t, c in zip(all_val, counts, strict=True)])
            p.grad = torch.sparse_coo_tensor(idx, val / size, g.shape)


def _per_row(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dim() >= 1
