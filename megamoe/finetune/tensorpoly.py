"""TLoRA and TensorPoly-I / -II (seed 000): LoRA factors built from Kronecker products.

Each row of a LoRA factor (A: [r, I]; B stored as B^T: [r, O]) is not a free vector but
``trunc_d( sum_k  u_{k,1} (x) u_{k,2} (x) ... (x) u_{k,N} )``: K components, each the
Kronecker product of N small vectors of length m = smallest integer with m^N >= d, truncated
to the first d entries. A factor costs r*K*N*m parameters instead of r*d.

Routing (task level, relaxed Bernoulli in training / sigmoid at eval, normalised to 1):
- ``tensorpoly1``: per task, weights over the K components ("each rank of the entangled
  tensor"); the same weights mix A's and B's components.
- ``tensorpoly2``: each order n has its own inventory of ``tensor_skills`` vectors; per task
  and order, the small vector is the weighted mix of that order's inventory, so the task's
  factor is one of (inventory)^N implicit experts. Components are summed unweighted.

Init / scaling (the paper leaves them open): LoRA convention, alpha/r, A random, B zero.
Trap: a Kronecker product of all-zero vectors never gets a gradient, so only B's *last* order
is zero and its other orders are N(0,1); A's vectors are N(0, s) with s^N*sqrt(K) ~ 1/sqrt(I).
"""

from __future__ import annotations

import torch

from megamoe.finetune.adapters import TaskAdapter, lora_apply, relaxed_bernoulli
from megamoe.finetune.config import AdapterConfig


def root_len(d: int, order: int) -> int:
    """Smallest m with m**order >= d (integer arithmetic: no float-root off-by-one)."""
    m = max(1, round(d ** (1.0 / order)))
    while m ** order < d:
        m += 1
    while m > 1 and (m - 1) ** order >= d:
        m -= 1
    return m


def kron_rows(u: torch.Tensor, d: int) -> torch.Tensor:
    """u [..., N, m] -> [..., d]: u[...,0,:] (x) u[...,1,:] (x) ... truncated to d (torch.kron order)."""
    v = u[..., 0, :]
    for n in range(1, u.shape[-2]):
        v = (v[..., :, None] * u[..., n, None, :]).flatten(-2)
    return v[..., :d]


class TensorPoly(TaskAdapter):
    def __init__(self, cfg: AdapterConfig, in_features: int, out_features: int):
        super().__init__(cfg, in_features, out_features)
        r, K, N, T = cfg.rank, cfg.tensor_components, cfg.tensor_order, cfg.num_tasks
        self.two = cfg.method == "tensorpoly2"
        self.scale = cfg.alpha / r
        mi, mo = root_len(in_features, N), root_len(out_features, N)
        inv = (cfg.tensor_skills,) if self.two else ()
        # [r, K, N, (S,) m]: with tensorpoly2 the inventory axis sits before the vector.
        self.vec_A = torch.nn.Parameter(torch.empty(r, K, N, *inv, mi))
        self.vec_B = torch.nn.Parameter(torch.empty(r, K, N, *inv, mo))
        s = (in_features ** -0.5 / K ** 0.5) ** (1.0 / N)
        torch.nn.init.normal_(self.vec_A, std=s)
        torch.nn.init.normal_(self.vec_B)
        with torch.no_grad():
            self.vec_B[:, :, N - 1].zero_()
        shape = (T, N, cfg.tensor_skills) if self.two else (T, K)
        self.logits = torch.nn.Parameter(torch.empty(shape).uniform_(-1e-3, 1e-3))

    def _weights(self, tasks_B):
        w = relaxed_bernoulli(self.logits[tasks_B], self.training, self.cfg.temperature)
        return w / (w.sum(-1, keepdim=True) + 1e-12)

    def factors(self, tasks_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example A [B, r, I] and B [B, O, r]."""
        I, O = self.in_features, self.out_features
        w = self._weights(tasks_B)
        if self.two:  # w [B, N, S]: mix each order's inventory, then Kronecker, sum components
            uA = torch.einsum("bns,rknsm->brknm", w, self.vec_A)
            uB = torch.einsum("bns,rknsm->brknm", w, self.vec_B)
            A = kron_rows(uA, I).sum(2)
            Bt = kron_rows(uB, O).sum(2)
        else:  # w [B, K]: weight the components
            A = torch.einsum("bk,rkd->brd", w, kron_rows(self.vec_A, I))
            Bt = torch.einsum("bk,rkd->brd", w, kron_rows(self.vec_B, O))
        return A, Bt.transpose(1, 2)

    def delta(self, x_BNI, y_BNO):
        A_BrI, B_BOr = self.factors(self._tasks(x_BNI.shape[0]))
        return lora_apply(x_BNI, A_BrI, B_BOr, self.scale)
