"""Upcycling a trained dense FFN into Switch experts or MPO experts (canonical names).

Both functions take the dense block's weights ``{gate_proj, up_proj, down_proj}.weight``
([out, in]) and return the canonical ``experts.*`` entries (without the layer prefix), to be
loaded with ``MoELayer.load_full`` (which handles EP/TP sharding). The router is not touched.

Function preserved at init: with zero noise every expert equals the dense FFN, so the layer
computes ``sum_k w_k * FFN(x)``, which is the dense block iff the combine weights of each token
sum to 1. ``router.combine`` straight_through (the default: ``p / p.detach()`` at top-1, as the
MPOE official code, RUCAIBox/MPO ``compress_tools/modeling_t5_utils.py`` SwitchFFN) and
renormalize (top-k >= 2) do; ``prob`` gives ~FFN/E at init (p ~ 1/E), which
:func:`upcycle_layer` refuses unless ``allow_prob_combine``. MPO experts reproduce the dense
matrix to float error when the bond dimension is not truncated. Two things still differ from
the dense model: tokens dropped by capacity ride the residual (use capacity_factor <= 0 for an
exact start), and ``noise > 0``.

Symmetry breaking: the official code copies experts without noise; the router (random at init)
or hash table already sends different tokens to different experts, so their gradients differ
from the first step. ``noise`` > 0 adds ``w + noise * std(w) * N(0, 1)`` (seeded) per expert
(MPO: on each expert's auxiliary tensors; the central tensor is shared unchanged), at the price
of the exact start.
"""

from __future__ import annotations

import torch

from megamoe.errors import UserError
from megamoe.moe.mpo import MPOExperts, central_index, decompose


def _noisy(t: torch.Tensor, noise: float, g: torch.Generator) -> torch.Tensor:
    if noise <= 0:
        return t.clone()
    return t + noise * t.std() * torch.randn(t.shape, generator=g).to(t.dtype)


def dense_to_switch(dense: dict[str, torch.Tensor], num_experts: int, noise: float = 0.0,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"experts.{e}.{name}": _noisy(w, noise, g) for e in range(num_experts) for name, w in dense.items()}


def dense_to_mpo(dense: dict[str, torch.Tensor], experts: MPOExperts, noise: float = 0.0,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    c = central_index(experts.n)
    for proj in experts.projs:
        rows, cols = experts.matrix_shape(proj)
        tensors = decompose(dense[f"{proj}.weight"], rows, cols, experts.max_bond)
        out[f"experts.{proj}.central"] = tensors[c]
        for e in range(experts.num_experts):
            for k in experts.aux_idx:
                out[f"experts.{e}.{proj}.aux{k}"] = _noisy(tensors[k], noise, g)
    return out


def upcycle_layer(layer, dense: dict[str, torch.Tensor], noise: float = 0.0, seed: int = 0, *,
                  allow_prob_combine: bool = False) -> None:
    """Load a dense FFN's weights into ``layer`` (an MoELayer), keeping its router."""
    rc = getattr(layer.router, "cfg", None)
    if getattr(rc, "combine", None) == "prob" and not allow_prob_combine:
        raise UserError("upcycling under moe.router.combine=prob scales each upcycled block's output by its router "
                        "probability (~1/num_experts at init), so the model no longer computes the dense one; use "
                        "moe.router.combine=straight_through (or renormalize at top_k >= 2)")
    if isinstance(layer.experts, MPOExperts):
        full = dense_to_mpo(dense, layer.experts, noise, seed)
    else:
        full = dense_to_switch(dense, layer.num_experts, noise, seed)
    full.update({f"router.{k}": v for k, v in layer.router.state_dict().items()})
    layer.load_full(full)
