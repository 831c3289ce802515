"""Upcycling a trained dense FFN into Switch experts or MPO experts (canonical names).

Both functions take the dense block's weights ``{gate_proj, up_proj, down_proj}.weight``
([out, in]) and return the canonical ``experts.*`` entries (without the layer prefix), to be
loaded with ``MoELayer.load_full`` (which handles EP/TP sharding). The router is not touched:
a freshly initialised router already routes differently per token.

Symmetry breaking: identical experts stay identical under identical routing gradients, so
each expert gets ``w + noise * std(w) * N(0, 1)`` (seeded). For MPO experts the dense matrix
is decomposed once (with the layer's factorisation and bond cap), the central tensor is
shared unchanged and the noise goes on each expert's auxiliary tensors.
"""

from __future__ import annotations

import torch

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


def upcycle_layer(layer, dense: dict[str, torch.Tensor], noise: float = 0.01, seed: int = 0) -> None:
    """Load a dense FFN's weights into ``layer`` (an MoELayer), keeping its router."""
    if isinstance(layer.experts, MPOExperts):
        full = dense_to_mpo(dense, layer.experts, noise, seed)
    else:
        full = dense_to_switch(dense, layer.num_experts, noise, seed)
    full.update({f"router.{k}": v for k, v in layer.router.state_dict().items()})
    layer.load_full(full)
