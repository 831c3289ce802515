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
  by all experts of the layer, and the auxiliary tensors stacked over local experts
  ``experts.{proj}.aux{k}`` ``[L, r, i, j, r']`` (k = the tensor's position in the chain; the
  central position is skipped, e.g. aux0, aux1, aux3, aux4 for n=5). Canonical (checkpoint,
  HF) names stay per expert: ``experts.{e}.{proj}.aux{k}``.

Compute: each forward contracts every local expert's chain ONCE into the FFN experts'
stacked layout ``[L, F, D]`` (:func:`build_weights`, batched over experts, in fp32), then runs
the same grouped path as FFN experts (:func:`megamoe.moe.experts.expert_ffn`: one weight
gradient buffer per projection, ``torch._grouped_mm`` on CUDA). The contraction tree is the
one with the fewest multiply-adds (:func:`contraction_order`, matrix-chain dynamic
programming; tools/bench_moe.py times every tree and prints the measured best beside it).
Any exact tree costs at least ~E * I * J * r_mid (r_mid the bond at the central tensor) per
projection, i.e. about ``r_mid / (tokens per expert)`` of the expert FFN's own FLOPs: cheap
at hundreds of tokens per expert, as much as the FFN itself at 64 tokens and bond 64.
Contracting the tokens through the chain instead costs more per token than the dense matmul
at these bond dims, so it is not used.

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

from megamoe.moe.experts import PROJS_GELU, PROJS_SWIGLU, _gather, expert_ffn, mark_expert_param, resolve_backend


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


# ---- contracting every expert's chain into the stacked layout ----
# A contraction order is a binary tree over chain positions: a leaf is an int k, a node a pair
# (left, right) of adjacent segments. A segment k..l is held as [E, r_k, X, r_{l+1}] (X the
# (i, j) pairs of its tensors, interleaved i_k j_k i_{k+1} ...), so merging two segments is
# ONE (batched) matmul over the shared bond with no permute; a single permute at the end puts
# W in the target layout. The central tensor alone has no expert dim.


def _seg_cost(shapes, k: int, m: int, l: int, c: int, E: int) -> int:
    """Multiply-adds of merging segments k..m and m+1..l (E-fold unless only central has no E)."""
    x1 = math.prod(s[1] * s[2] for s in shapes[k:m + 1])
    x2 = math.prod(s[1] * s[2] for s in shapes[m + 1:l + 1])
    return E * shapes[k][0] * x1 * shapes[m][3] * x2 * shapes[l][3]


def contraction_order(shapes, c: int, E: int):
    """(cheapest tree, its multiply-adds) for a chain of tensor ``shapes`` [(r, i, j, r'), ...]
    with the shared central tensor at ``c``, by dynamic programming over split points (the
    matrix-chain recursion; n is at most ~8). Backward costs ~2x each merge, so the same tree
    is also the cheapest for forward + backward."""
    n = len(shapes)
    best: dict[tuple[int, int], tuple[int, object]] = {(k, k): (0, k) for k in range(n)}
    for span in range(1, n):
        for k in range(n - span):
            l = k + span
            best[k, l] = min(((best[k, m][0] + best[m + 1, l][0] + _seg_cost(shapes, k, m, l, c, E),
                               (best[k, m][1], best[m + 1, l][1])) for m in range(k, l)), key=lambda t: t[0])
    cost, tree = best[0, n - 1]
    return tree, cost


def central_last_order(n: int, c: int, left_first: bool = True):
    """The previous fixed order, kept to measure against: contract the auxiliary chains left
    and right of the central tensor, then the central tensor with one side, then the other."""
    left = 0
    for k in range(1, c):
        left = (left, k)
    right = n - 1
    for k in range(n - 2, c, -1):
        right = (k, right)
    if c == 0:
        return (c, right)
    if c == n - 1:
        return (left, c)
    return (left, (c, right)) if left_first else ((left, c), right)


def tree_cost(tree, shapes, c: int, E: int) -> int:
    def walk(t):
        if isinstance(t, int):
            return t, t, 0
        k, m, a = walk(t[0])
        m2, l, b = walk(t[1])
        assert m2 == m + 1, t
        return k, l, a + b + _seg_cost(shapes, k, m, l, c, E)
    return walk(tree)[2]


def _merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[E?, r, X1, s] x [E?, s, X2, t] -> [E, r, X1 * X2, t] (3-D operands: the central tensor)."""
    if a.dim() == 4 and b.dim() == 4:
        E, r, x1, s = a.shape
        out = torch.bmm(a.reshape(E, r * x1, s), b.reshape(E, s, -1))
    elif a.dim() == 3:
        r, x1, s = a.shape
        E = b.shape[0]
        out = torch.matmul(a.reshape(r * x1, s), b.reshape(E, s, -1))
    else:
        E, r, x1, s = a.shape
        out = a.reshape(E * r * x1, s) @ b.reshape(s, -1)
    return out.reshape(E, r, -1, b.shape[-1])


def _span(node) -> tuple[int, int]:
    return (node, node) if isinstance(node, int) else (_span(node[0])[0], _span(node[1])[1])


def _split_ij(t: torch.Tensor, seg_shapes) -> torch.Tensor:
    """[E?, r, X, s] (X interleaved i_k j_k ...) -> [E?, r, I, J, s] (I = the i's, J = the j's)."""
    lead, (r, _, s) = t.shape[:-3], t.shape[-3:]
    dims = [d for sh in seg_shapes for d in sh[1:3]]
    t = t.reshape(*lead, r, *dims, s)
    b = len(lead) + 1  # first (i, j) dim
    n = len(seg_shapes)
    perm = [*range(b), *[b + 2 * k for k in range(n)], *[b + 2 * k + 1 for k in range(n)], b + 2 * n]
    return t.permute(perm).reshape(*lead, r, math.prod(sh[1] for sh in seg_shapes),
                                   math.prod(sh[2] for sh in seg_shapes), s)


def build_weights(tensors: list[torch.Tensor], c: int, order=None, transpose: bool = False) -> torch.Tensor:
    """Dense W of every expert, ``[E, I, J]`` (``[E, J, I]`` with ``transpose``), from the chain
    ``tensors``: position ``c`` the shared central ``[a, i, j, b]``, the others per-expert stacks
    ``[E, r, i, j, r']``. ``order``: a contraction tree (default: :func:`contraction_order`).

    The two halves of the root merge are brought to (I, J) order first (small tensors), so the
    root matmul gives ``[E, I_L, J_L, I_R, J_R]`` and W needs one 5-dim permute. (Permuting the
    interleaved ``[E, i1, j1, ..., in, jn]`` W instead is an 11-dim copy, 2x slower measured.)"""
    shapes = [tuple(t.shape[-4:]) for t in tensors]
    E = next(t.shape[0] for k, t in enumerate(tensors) if k != c)
    if order is None:
        order = contraction_order(shapes, c, E)[0]
    assert isinstance(order, tuple), "a chain of at least 2 tensors"
    leaves = [t.reshape(*t.shape[:-3], t.shape[-3] * t.shape[-2], t.shape[-1]) for t in tensors]

    def run(node):
        return leaves[node] if isinstance(node, int) else _merge(run(node[0]), run(node[1]))

    halves = []
    for node in order:
        lo, hi = _span(node)
        halves.append(_split_ij(run(node), shapes[lo:hi + 1]))  # [E?, r, I_h, J_h, s]
    (lt, rt) = halves
    il, jl, b = lt.shape[-3:]
    _, ir, jr, _ = rt.shape[-4:]
    w = torch.matmul(lt.reshape(*lt.shape[:-4], il * jl, b), rt.reshape(*rt.shape[:-4], b, ir * jr))
    w = w.expand(E, il * jl, ir * jr).reshape(E, il, jl, ir, jr)
    w = w.permute(0, 2, 4, 1, 3) if transpose else w.permute(0, 1, 3, 2, 4)
    return w.reshape(E, jl * jr, il * ir) if transpose else w.reshape(E, il * ir, jl * jr)


class _MPOProj(nn.Module):
    """One projection's chain: the shared ``central`` and the stacked ``aux{k}`` [L, r, i, j, r']."""


class MPOExperts(nn.Module):
    """Drop-in for FFNExperts (same forward contract); see the module docstring."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, activation: str = "swiglu", *,
                 num_tensors: int = 5, input_shape=None, output_shape=None, max_bond: int = 0,
                 num_blocks: int = 1, ep_size: int = 1, ep_rank: int = 0, ep_group=None,
                 init_std: float = 0.02, output_std: float | None = None, seed: int = 0, backend: str = "auto"):
        super().__init__()
        self.hidden, self.ffn, self.num_experts, self.num_blocks = hidden, ffn, num_experts, num_blocks
        self.swiglu = activation == "swiglu"
        self.projs = PROJS_SWIGLU if self.swiglu else PROJS_GELU
        self.ep_size, self.ep_rank, self.ep_group = ep_size, ep_rank, ep_group
        resolve_backend(backend, torch.device("cpu"))
        self.backend = backend
        self.d_shape = list(input_shape) if input_shape else factorize(hidden, num_tensors)
        self.f_shape = list(output_shape) if output_shape else factorize(ffn, num_tensors)
        self.max_bond, self.n, self.c = max_bond, num_tensors, central_index(num_tensors)
        n_local = num_experts // ep_size
        self.expert_ids = list(range(ep_rank * n_local, (ep_rank + 1) * n_local))
        self.aux_idx = [k for k in range(self.n) if k != self.c]
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        for proj in self.projs:
            shapes = self.shapes(proj)
            mod = _MPOProj()
            mod.central = nn.Parameter(torch.empty(shapes[self.c]))
            set_tensor_model_parallel_attributes(mod.central, False, -1, 1)
            for k in self.aux_idx:
                p = nn.Parameter(torch.empty(n_local, *shapes[k]))
                mark_expert_param(p, ep_size)
                set_tensor_model_parallel_attributes(p, False, -1, 1)
                mod.register_parameter(f"aux{k}", p)
            self.add_module(proj, mod)
        stds = {proj: init_std for proj in self.projs}
        stds["down_proj"] = init_std if output_std is None else output_std
        g = torch.Generator().manual_seed(seed)
        for e in range(num_experts):  # every rank draws all experts: same init whatever EP is
            inits = {proj: init_tensors(*self.matrix_shape(proj), max_bond, stds[proj], g) for proj in self.projs}
            with torch.no_grad():
                for proj in self.projs:
                    mod = getattr(self, proj)
                    if e == 0:
                        mod.central.copy_(inits[proj][self.c])
                    if e in self.expert_ids:
                        for k in self.aux_idx:
                            getattr(mod, f"aux{k}")[e - self.expert_ids[0]].copy_(inits[proj][k])
        self.orders = {proj: contraction_order(self.shapes(proj), self.c, n_local)[0] for proj in self.projs}

    def matrix_shape(self, proj: str) -> tuple[list[int], list[int]]:
        """(row factors, col factors) of the [out, in] weight."""
        return (self.d_shape, self.f_shape) if proj == "down_proj" else (self.f_shape, self.d_shape)

    def shapes(self, proj: str):
        return tensor_shapes(*self.matrix_shape(proj), self.max_bond)

    def centrals(self) -> list[nn.Parameter]:
        return [getattr(self, proj).central for proj in self.projs]

    def chain(self, proj: str) -> list[torch.Tensor]:
        mod = getattr(self, proj)
        return [mod.central if k == self.c else getattr(mod, f"aux{k}") for k in range(self.n)]

    def weights(self, proj: str, order=None) -> torch.Tensor:
        """Every local expert's dense W in the FFNExperts layout ``[L, F, D]`` (down_proj
        transposed), differentiable. Contracted in fp32 whatever the parameter dtype (a bf16
        chain would round after every one of its n - 1 merges), then cast back."""
        dtype = self.centrals()[0].dtype
        w = build_weights([t.float() for t in self.chain(proj)], self.c, order or self.orders[proj],
                          transpose=proj == "down_proj")
        return w.to(dtype)

    def forward(self, x_RD: torch.Tensor, counts_L: torch.Tensor, host_counts_L: list[int] | None = None
                ) -> torch.Tensor:
        # W is built once per forward for all local experts (one tree per projection), then
        # the FFN experts' grouped path runs every slot, even empty ones: every rank gives
        # every parameter (the shared central tensors above all) a gradient at the same point
        # of backward, as ZeRO-1/2's ordered bucket reduction needs.
        ws = [self.weights(p) if p in self.projs else None for p in PROJS_SWIGLU]
        return expert_ffn(x_RD, counts_L, *ws, self.num_blocks, self.backend, host_counts_L)

    # ---- full state dict, canonical names ----
    def full_keys(self, prefix: str) -> list[str]:
        keys = [f"{prefix}{proj}.central" for proj in self.projs]
        return keys + [f"{prefix}{e}.{proj}.aux{k}" for e in range(self.num_experts) for proj in self.projs
                       for k in self.aux_idx]

    def gather_full(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}{proj}.central": getattr(self, proj).central.detach().clone() for proj in self.projs}
        n_local = len(self.expert_ids)
        for proj in self.projs:
            for k in self.aux_idx:
                local = getattr(getattr(self, proj), f"aux{k}").detach()
                for r, block in enumerate(_gather(local, self.ep_group, self.ep_size)):
                    for i, t in enumerate(block):
                        out[f"{prefix}{r * n_local + i}.{proj}.aux{k}"] = t.clone()
        return out

    def load_full(self, sd: dict[str, torch.Tensor], prefix: str) -> None:
        with torch.no_grad():
            for proj in self.projs:
                mod = getattr(self, proj)
                mod.central.copy_(sd[f"{prefix}{proj}.central"])
                for k in self.aux_idx:
                    aux = getattr(mod, f"aux{k}")
                    for i, e in enumerate(self.expert_ids):
                        aux[i].copy_(sd[f"{prefix}{e}.{proj}.aux{k}"])
