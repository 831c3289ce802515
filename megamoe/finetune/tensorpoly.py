"""TensorPoly-I / -II (seed 000) as the official code builds them: microsoft/mttl, branch
``zs_code``, ``mttl/models/poly.py`` (``PolyLoRATensor`` = TensorPoly-I,
``PolyLoRATensorOrder`` = TensorPoly-II). Written from a reading of that file, not copied.

Leaves: ``leaves_A [order, S, r, mA]`` and ``leaves_B [order, S, r, mB]`` with m = ceil(d^(1/order))
(``root_len``: integer arithmetic where the official ``math.ceil(d ** (1/order))`` can be off by
one for exact powers), S = ``num_skills`` (the official "tensor rank" = ``n_skills``).
A factor row is built from its leaves by ``construct``:

- order 1: the leaf itself;
- order 2: ``LN(l0 (x) l1)``, truncated to d;
- order 4: ``LN(l0 (x) l1) (x) LN'(l2 (x) l3)``, truncated to d;

where (x) is the Kronecker product of rows (first leaf major, as ``torch.kron``) and LN a
``LayerNorm([r, m^2])`` -- normalised jointly over the rank and the m^2 entries, with affine
weights. TensorPoly-I uses *one* LayerNorm per factor for both pairs (as the official code);
TensorPoly-II uses two (``layerone``/``layertwo``).

Routing (task level, relaxed Bernoulli or sigmoid, normalised to sum 1, scale ``alpha/r`` =
1/r by default as the official ``/ self.rank``):

- ``tensorpoly1``: per task one weight vector over the S components; the task's A and B are
  the weighted sums of the S constructed factors (the same weights mix A and B).
- ``tensorpoly2``: per task and *order* a weight vector over that order's S leaves; the task's
  leaves are mixed first (and scaled by the weights' sum, the official "tensorpoly-II" line,
  ~1 after normalisation), then constructed: S^order implicit experts.

Init (``tensor_init="official"``): TensorPoly-I both leaf sets U(+-gain/sqrt(I)) with
gain = calculate_gain("leaky_relu", sqrt(5)) ~ 0.577; TensorPoly-II Xavier-uniform on the
4-D leaf tensors. B is *not* zero, so unlike LoRA the adapter changes the model at init (the
LayerNorm makes the constructed rows O(1) whatever the leaf scale). ``"zero"`` is megamoe's
departure (mttl has no zero init for TensorPoly; its plain Poly ``PolyLoRALinear.reset_parameters``
zeroes ``lora_b``, the LoRA convention): it zeroes B's LayerNorm affine (order 1: B's leaves) for
a no-op start. At order 2 the gradient reaches that affine (B = LN(.), linear in it). Trap, why
the config refuses it at order 4: B = kron(LN(l0 (x) l1), LN'(l2 (x) l3)) with both factors 0 is a
bilinear saddle -- every adapter gradient is exactly 0 forever (the old suite's dead arm,
issue 29; tests/finetune/test_adapters.py checks every order and init).
"""

from __future__ import annotations

import math

import torch

from megamoe.finetune.base import LowRankAdapter, normalise, relaxed_bernoulli


def root_len(d: int, order: int) -> int:
    """Smallest m with m**order >= d (integer arithmetic: no float-root off-by-one)."""
    m = max(1, round(d ** (1.0 / order)))
    while m ** order < d:
        m += 1
    while m > 1 and (m - 1) ** order >= d:
        m -= 1
    return m


def kron_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product over the last dim: [..., m], [..., n] -> [..., m*n]."""
    return (a[..., :, None] * b[..., None, :]).flatten(-2)


class TensorPoly(LowRankAdapter):
    def __init__(self, cfg, in_features: int, out_features: int):
        super().__init__(cfg, in_features, out_features)
        self.two = cfg.method == "tensorpoly2"
        N, S, r, T = cfg.tensor_order, cfg.num_skills, cfg.rank, cfg.num_tasks
        self.N, self.S, self.r, self.scale = N, S, r, cfg.alpha / r
        mA, mB = root_len(in_features, N), root_len(out_features, N)
        self.leaves_A = torch.nn.Parameter(torch.empty(N, S, r, mA))
        self.leaves_B = torch.nn.Parameter(torch.empty(N, S, r, mB))
        n_norms = (2 if self.two else 1) if N == 4 else (1 if N == 2 else 0)
        self.norms_A = torch.nn.ModuleList(torch.nn.LayerNorm([r, mA * mA]) for _ in range(n_norms))
        self.norms_B = torch.nn.ModuleList(torch.nn.LayerNorm([r, mB * mB]) for _ in range(n_norms))
        with torch.no_grad():
            if self.two:
                torch.nn.init.xavier_uniform_(self.leaves_A)
                torch.nn.init.xavier_uniform_(self.leaves_B)
            else:
                bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(in_features)
                self.leaves_A.uniform_(-bound, bound)
                self.leaves_B.uniform_(-bound, bound)
            if cfg.tensor_init == "zero":
                if n_norms:
                    for ln in self.norms_B:
                        ln.weight.zero_()
                        ln.bias.zero_()
                else:
                    self.leaves_B.zero_()
        self.module_logits = torch.nn.Parameter(torch.empty(T, (N if self.two else 1) * S).uniform_(-1e-3, 1e-3))

    def construct(self, leaves: torch.Tensor, norms, d: int) -> torch.Tensor:
        """leaves [N, ..., r, m] -> rows [..., r, d] (see the module docstring)."""
        if self.N == 1:
            return leaves[0][..., :d]
        w01 = norms[0](kron_rows(leaves[0], leaves[1]))
        if self.N == 2:
            return w01[..., :d]
        w23 = norms[-1](kron_rows(leaves[2], leaves[3]))  # TensorPoly-I: the same LayerNorm
        return kron_rows(w01, w23)[..., :d]

    def _weights(self, tasks_B):
        B = tasks_B.shape[0]
        w = relaxed_bernoulli(self.module_logits[tasks_B].view(B, -1, self.S), self.training,
                              self.cfg.temperature, self.cfg.relaxed_bernoulli)
        return normalise(w)  # [B, N, S] (II) or [B, 1, S] (I)

    def factors(self, tasks_B):
        I, O = self.in_features, self.out_features
        w = self._weights(tasks_B)
        if self.two:
            s = w.sum(-1)[..., None, None]  # the official "tensorpoly-II" rescale (~1)
            lA = torch.einsum("bns,nsrm->bnrm", w, self.leaves_A) * s
            lB = torch.einsum("bns,nsrm->bnrm", w, self.leaves_B) * s
            A = self.construct(lA.transpose(0, 1), self.norms_A, I)  # [B, r, I]
            Bt = self.construct(lB.transpose(0, 1), self.norms_B, O)
        else:
            A_SrI = self.construct(self.leaves_A, self.norms_A, I)
            B_SrO = self.construct(self.leaves_B, self.norms_B, O)
            A = torch.einsum("bs,sri->bri", w[:, 0], A_SrI)
            Bt = torch.einsum("bs,sro->bro", w[:, 0], B_SrO)
        return A, Bt.transpose(1, 2)

    @torch.no_grad()
    def routing_weights(self):
        return normalise(torch.sigmoid(self.module_logits).view(self.module_logits.shape[0], -1, self.S))
