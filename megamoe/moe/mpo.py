"""Matrix product operators (MPO) and MPO experts with one shared central tensor (MPOE).

Legend: I x J the matrix (rows x cols, nn.Linear orientation [out, in]); n local tensors
``A_k`` of shape ``(r_{k-1}, i_k, j_k, r_k)`` with ``r_0 = r_n = 1``; c = (n-1)//2 the central
index; E experts. Written by hand: no dependency provides MPO layers.

- :func:`decompose`: reshape W to (i1..in, j1..jn), interleave to (i1 j1 ... in jn), split by
  successive SVDs (float64). Exact without truncation; ``max_bond`` caps every r_k.
- :func:`contract`: the chain back to W.
- :func:`factorize`: automatic factorisation of a dimension into n factors.
- :func:`init_tensors`: from-scratch init whose contracted W has the variance std^2 of a dense
  N(0, std^2) init: every entry of every A_k ~ N(0, s^2) with s^{2n} * prod(r_1..r_{n-1}) = std^2
  (each W entry is a sum of prod(r) products of n independent factors).
- :class:`MPOExperts`: per projection, ONE central parameter ``experts.{proj}.central`` shared
  by all experts of the layer, and per expert the auxiliary tensors
  ``experts.{e}.{proj}.aux{k}`` (k = the tensor's position in the chain; the central position
  is skipped, e.g. aux0, aux1, aux3, aux4 for n=5).

Compute: each forward builds every local expert's dense W once (batched over experts: the
small auxiliary chains left and right of C are contracted first, then C is contracted with
the cheaper side for all experts in one matmul, then the other side by bmm), and ``unbind``s
it so each expert's matmul produces only its own gradient. Contracting the tokens through
the chain instead costs more per token than the dense matmul at these bond dims (measured
in tools/bench_moe.py notes), so it is not used.

Parallelism traps:
- EP: the central tensor is NOT an expert parameter: it is replicated on every rank and its
  gradient (from this rank's experts only) must be reduced over the FULL data-parallel group,
  like any dense weight. Only the auxiliary tensors carry the DeepSpeed expert markers.
- TP: MPO experts compute replicated on every TP rank (no F sharding: the factorised F cannot
  be split without breaking the chain). Their gradients are identical on TP ranks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megamoe.moe.experts import PROJS_GELU, PROJS_SWIGLU, _gather, activate, mark_expert_param


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out + ([n] if n > 1 else [])


def factorize(dim: int, n: int) -> list[int]:
    """n factors of ``dim`` (product exact), as equal as greedy allows, largest in the middle
    (where the bond dimensions are largest)."""
    prods = [1] * n
    for p in sorted(_prime_factors(dim), reverse=True):
        i = min(range(n), key=lambda k: (prods[k], k))
        prods[i] *= p
    asc = sorted(prods)
    left, right = asc[0::2], asc[1::2]
    return left + right[::-1]


def bond_dims(out_shape: list[int], in_shape: list[int], max_bond: int = 0) -> list[int]:
    """[r_0, ..., r_n]; r_k = min(prod_{m<=k} i_m j_m, prod_{m>k} i_m j_m[, max_bond])."""
    ij = [i * j for i, j in zip(out_shape, in_shape)]
    dims = [1]
    for k in range(1, len(ij)):
        r = min(math.prod(ij[:k]), math.prod(ij[k:]))
        dims.append(min(r, max_bond) if max_bond > 0 else r)
    return dims + [1]


def tensor_shapes(out_shape, in_shape, max_bond=0) -> list[tuple[int, int, int, int]]:
    r = bond_dims(out_shape, in_shape, max_bond)
    return [(r[k], out_shape[k], in_shape[k], r[k + 1]) for k in range(len(out_shape))]


def central_index(n: int) -> int:
    return (n - 1) // 2


def num_params(out_shape, in_shape, max_bond=0) -> tuple[int, int]:
    """(central entries, auxiliary entries) of one MPO."""
    sizes = [math.prod(s) for s in tensor_shapes(out_shape, in_shape, max_bond)]
    c = central_index(len(sizes))
    return sizes[c], sum(sizes) - sizes[c]


def decompose(w_IJ: torch.Tensor, out_shape: list[int], in_shape: list[int], max_bond: int = 0) -> list[torch.Tensor]:
    n = len(out_shape)
    assert math.prod(out_shape) == w_IJ.shape[0] and math.prod(in_shape) == w_IJ.shape[1], (w_IJ.shape, out_shape, in_shape)
    dims = bond_dims(out_shape, in_shape, max_bond)
    m = w_IJ.double().reshape(*out_shape, *in_shape)
    m = m.permute([p for k in range(n) for p in (k, n + k)])  # i1 j1 i2 j2 ...
    tensors = []
    for k in range(n - 1):
        m = m.reshape(dims[k] * out_shape[k] * in_shape[k], -1)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        r = dims[k + 1]
        tensors.append(u[:, :r].reshape(dims[k], out_shape[k], in_shape[k], r))
        m = s[:r, None] * vh[:r]
    tensors.append(m.reshape(dims[n - 1], out_shape[n - 1], in_shape[n - 1], 1))
    return [t.to(w_IJ.dtype).contiguous() for t in tensors]


def contract(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Chain of (r, i, j, r') tensors -> W [prod i, prod j]."""
    t = tensors[0]  # [1, I, J, r]
    for a in tensors[1:]:
        _, I, J, r = t.shape
        _, i, j, s = a.shape
        t = (t.reshape(I * J, r) @ a.reshape(r, i * j * s)).reshape(I, J, i, j, s)
        t = t.permute(0, 2, 1, 3, 4).reshape(1, I * i, J * j, s)
    return t[0, :, :, 0] if t.dim() == 4 else t


def init_tensors(out_shape, in_shape, max_bond=0, std=0.02, generator=None) -> list[torch.Tensor]:
    shapes = tensor_shapes(out_shape, in_shape, max_bond)
    n = len(shapes)
    inner = math.prod(s[3] for s in shapes[:-1])
    s = (std * std / inner) ** (1.0 / (2 * n))
    return [torch.randn(sh, generator=generator) * s for sh in shapes]


def _left_chain(tensors_E: list[torch.Tensor]) -> torch.Tensor:
    """[E, r0, i, j, r] list -> [E, IL*JL... ] as [E, IL, JL, r]."""
    t = tensors_E[0][:, 0]  # [E, i, j, r]
    for a in tensors_E[1:]:
        t = torch.einsum("eIJr,erijs->eIiJjs", t, a)
        t = t.reshape(t.shape[0], t.shape[1] * t.shape[2], t.shape[3] * t.shape[4], t.shape[5])
    return t


def _right_chain(tensors_E: list[torch.Tensor]) -> torch.Tensor:
    """-> [E, r, IR, JR]."""
    t = tensors_E[-1][..., 0]  # [E, r, i, j]
    for a in reversed(tensors_E[:-1]):
        t = torch.einsum("esijr,erIJ->esiIjJ", a, t)
        t = t.reshape(t.shape[0], t.shape[1], t.shape[2] * t.shape[3], t.shape[4] * t.shape[5])
    return t


def build_weights(central: torch.Tensor, aux_left: list[torch.Tensor], aux_right: list[torch.Tensor]) -> torch.Tensor:
    """W [E, I, J] for all experts: aux_left/right are per-position stacks [E, r, i, j, r']."""
    a, ic, jc, b = central.shape
    E = (aux_left or aux_right)[0].shape[0]
    L = _left_chain(aux_left) if aux_left else central.new_ones(E, 1, 1, 1)  # [E, IL, JL, a]
    R = _right_chain(aux_right) if aux_right else central.new_ones(E, 1, 1, 1)  # [E, b, IR, JR]
    _, IL, JL, _ = L.shape
    _, _, IR, JR = R.shape
    cost_cr = a * ic * jc * b * E * IR * JR + E * IL * JL * a * ic * jc * IR * JR
    cost_lc = E * IL * JL * a * ic * jc * b + E * IL * JL * ic * jc * b * IR * JR
    if cost_cr <= cost_lc:
        cr = central.reshape(a * ic * jc, b) @ R.permute(1, 0, 2, 3).reshape(b, E * IR * JR)
        cr = cr.reshape(a, ic * jc, E, IR * JR).permute(2, 0, 1, 3).reshape(E, a, ic * jc * IR * JR)
        w = torch.bmm(L.reshape(E, IL * JL, a), cr)
    else:
        lc = L.reshape(E * IL * JL, a) @ central.reshape(a, ic * jc * b)
        w = torch.bmm(lc.reshape(E, IL * JL * ic * jc, b), R.reshape(E, b, IR * JR))
    w = w.reshape(E, IL, JL, ic, jc, IR, JR).permute(0, 1, 3, 5, 2, 4, 6)
    return w.reshape(E, IL * ic * IR, JL * jc * JR)


class _ProjCentral(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.central = nn.Parameter(torch.empty(shape))


class MPOExperts(nn.Module):
    """Drop-in for FFNExperts (same forward contract); see the module docstring."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, activation: str = "swiglu", *,
                 num_tensors: int = 5, input_shape=None, output_shape=None, max_bond: int = 0,
                 num_blocks: int = 1, ep_size: int = 1, ep_rank: int = 0, ep_group=None,
                 init_std: float = 0.02, seed: int = 0):
        super().__init__()
        self.hidden, self.ffn, self.num_experts, self.num_blocks = hidden, ffn, num_experts, num_blocks
        self.swiglu = activation == "swiglu"
        self.projs = PROJS_SWIGLU if self.swiglu else PROJS_GELU
        self.ep_size, self.ep_rank, self.ep_group = ep_size, ep_rank, ep_group
        self.d_shape = list(input_shape) if input_shape else factorize(hidden, num_tensors)
        self.f_shape = list(output_shape) if output_shape else factorize(ffn, num_tensors)
        self.max_bond, self.n, self.c = max_bond, num_tensors, central_index(num_tensors)
        n_local = num_experts // ep_size
        self.expert_ids = list(range(ep_rank * n_local, (ep_rank + 1) * n_local))
        self.aux_idx = [k for k in range(self.n) if k != self.c]
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        g = torch.Generator().manual_seed(seed)
        for proj in self.projs:
            shapes = self.shapes(proj)
            mod = _ProjCentral(shapes[self.c])
            set_tensor_model_parallel_attributes(mod.central, False, -1, 1)
            self.add_module(proj, mod)
        for e in range(num_experts):  # every rank draws all experts: same init whatever EP is
            inits = {proj: init_tensors(*self.matrix_shape(proj), max_bond, init_std, g) for proj in self.projs}
            if e == 0:
                for proj in self.projs:
                    with torch.no_grad():
                        getattr(self, proj).central.copy_(inits[proj][self.c])
            if e not in self.expert_ids:
                continue
            mod = nn.Module()
            for proj in self.projs:
                pd = nn.ParameterDict({f"aux{k}": nn.Parameter(inits[proj][k]) for k in self.aux_idx})
                for p in pd.values():
                    mark_expert_param(p, ep_size)
                    set_tensor_model_parallel_attributes(p, False, -1, 1)
                mod.add_module(proj, pd)
            self.add_module(str(e), mod)
        self.local = [getattr(self, str(e)) for e in self.expert_ids]

    def matrix_shape(self, proj: str) -> tuple[list[int], list[int]]:
        """(row factors, col factors) of the [out, in] weight."""
        return (self.d_shape, self.f_shape) if proj == "down_proj" else (self.f_shape, self.d_shape)

    def shapes(self, proj: str):
        return tensor_shapes(*self.matrix_shape(proj), self.max_bond)

    def centrals(self) -> list[nn.Parameter]:
        return [getattr(self, proj).central for proj in self.projs]

    def weights(self, proj: str) -> torch.Tensor:
        """Dense W [L, out, in] of every local expert (differentiable)."""
        stacks = {k: torch.stack([getattr(loc, proj)[f"aux{k}"] for loc in self.local]) for k in self.aux_idx}
        left = [stacks[k] for k in range(self.c)]
        right = [stacks[k] for k in range(self.c + 1, self.n)]
        return build_weights(getattr(self, proj).central, left, right)

    def forward(self, x_RD: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        # Every slot runs, even with 0 tokens: ZeRO-1/2 reduce gradients in the order they
        # become ready, so every rank must give every parameter (the shared central tensors
        # above all) a gradient at the same point of backward; a 0-row matmul gives zeros.
        w = {proj: self.weights(proj).unbind(0) for proj in self.projs}
        outs = []
        for slot, x_rD in enumerate(torch.split(x_RD, counts_L.tolist())):
            e, blk = slot // self.num_blocks, slot % self.num_blocks
            wu, wd = w["up_proj"][e], w["down_proj"][e]
            wg = w["gate_proj"][e] if self.swiglu else None
            if self.num_blocks > 1:
                b = self.ffn // self.num_blocks
                sl = slice(blk * b, (blk + 1) * b)
                wu, wd, wg = wu[sl], wd[:, sl], (wg[sl] if wg is not None else None)
            h = activate(torch.nn.functional.linear(x_rD, wg) if wg is not None else None,
                         torch.nn.functional.linear(x_rD, wu))
            outs.append(torch.nn.functional.linear(h, wd))
        return torch.cat(outs)

    # ---- full state dict, canonical names ----
    def gather_full(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}{proj}.central": getattr(self, proj).central.detach().clone() for proj in self.projs}
        for proj in self.projs:
            for k in self.aux_idx:
                local = torch.stack([getattr(m, proj)[f"aux{k}"].detach() for m in self.local])
                for r, block in enumerate(_gather(local, self.ep_group, self.ep_size)):
                    for i, t in enumerate(block):
                        out[f"{prefix}{r * len(self.local) + i}.{proj}.aux{k}"] = t.clone()
        return out

    def load_full(self, sd: dict[str, torch.Tensor], prefix: str) -> None:
        with torch.no_grad():
            for proj in self.projs:
                getattr(self, proj).central.copy_(sd[f"{prefix}{proj}.central"])
                for e, m in zip(self.expert_ids, self.local):
                    for k in self.aux_idx:
                        getattr(m, proj)[f"aux{k}"].copy_(sd[f"{prefix}{e}.{proj}.aux{k}"])
