"""C-Poly (methods.md section 4, seed 003): Poly / MHR skills shared by all tasks plus private
skills per task. Hand-written because PEFT has Poly / MHR (``PolyConfig(poly_type="poly",
n_splits)``, which megamoe uses outright for ``method="poly"``) but no C-Poly.

The shared part is laid out exactly as PEFT's ``tuners/poly/layer.py`` (A ``[H, S, I/H, r]``,
B ``[H, S, r, O/H]``, ``module_logits [T, H*S]``, U(-1e-3, 1e-3); A kaiming-uniform over the
split's in-features, B zero; ``x @ A @ B * alpha/r``), so with ``private_skills=0`` and
``cpoly_normalize="joint"`` or ``"separate"`` this *is* PEFT's Poly/MHR given the same
parameters and the same random state (tests/finetune/test_peft_oracle.py). MHR (H > 1) splits
A's in-features and B's out-features into H contiguous blocks, each routed separately.

Private skills (P per task): ``private_A [T, H, P, I/H, r]``, ``private_B [T, H, P, r, O/H]``,
optional logits ``module_logits_private [T, H*P]``. How they are weighted is the setting
``cpoly_normalize`` (see megamoe/finetune/config.py; default ``"separate"``: full weight).
"""

from __future__ import annotations

import torch

from megamoe.finetune.base import LowRankAdapter, lora_init_, normalise, relaxed_bernoulli


class CPoly(LowRankAdapter):
    def __init__(self, cfg, in_features: int, out_features: int, private_skills: int):
        super().__init__(cfg, in_features, out_features)
        H, S, P, r, T = cfg.num_splits, cfg.num_skills, private_skills, cfg.rank, cfg.num_tasks
        if in_features % H or out_features % H:
            from megamoe.config import ConfigError
            raise ConfigError("num_splits", H, f"must divide the adapted layer's in ({in_features}) and "
                              f"out ({out_features}) features")
        self.H, self.S, self.P, self.r, self.scale = H, S, P, r, cfg.alpha / r
        # with one private skill normalised on its own ("separate") its weight is 1 whatever its
        # logit: such logits would be parameters that never get a gradient, so none are made
        self.route_private = cfg.cpoly_route_private and (P > 1 or cfg.cpoly_normalize == "joint")
        self.lora_A = torch.nn.Parameter(torch.empty(H, S, in_features // H, r))
        self.lora_B = torch.nn.Parameter(torch.zeros(H, S, r, out_features // H))
        self.module_logits = torch.nn.Parameter(torch.empty(T, H * S).uniform_(-1e-3, 1e-3))
        self._init_A(self.lora_A)
        if P:
            self.private_A = torch.nn.Parameter(torch.empty(T, H, P, in_features // H, r))
            self.private_B = torch.nn.Parameter(torch.zeros(T, H, P, r, out_features // H))
            self._init_A(self.private_A)
            if self.route_private:
                self.module_logits_private = torch.nn.Parameter(torch.empty(T, H * P).uniform_(-1e-3, 1e-3))

    @staticmethod
    def _init_A(A: torch.Tensor) -> None:
        # stored [..., I/H, r]; kaiming over the in-features like PEFT (fan_in = I/H)
        lora_init_(A.data.transpose(-1, -2))

    def weights(self, tasks_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(shared [B,H,S], private [B,H,P] or None), normalised per ``cpoly_normalize``."""
        cfg, B, H = self.cfg, tasks_B.shape[0], self.H
        ws = relaxed_bernoulli(self.module_logits[tasks_B].view(B, H, self.S), self.training, cfg.temperature,
                               cfg.relaxed_bernoulli)
        if not self.P:
            return normalise(ws), None
        if self.route_private:
            wp = relaxed_bernoulli(self.module_logits_private[tasks_B].view(B, H, self.P), self.training,
                                   cfg.temperature, cfg.relaxed_bernoulli)
        else:
            wp = ws.new_ones(B, H, self.P)
        if cfg.cpoly_normalize == "joint":
            z = ws.sum(-1, keepdim=True) + wp.sum(-1, keepdim=True) + 1e-12
            return ws / z, wp / z
        return normalise(ws), normalise(wp)

    def factors(self, tasks_B):
        """Per-example A [B, r, I] and B [B, O, r] (PEFT's einsums, then our layout)."""
        nB, r = tasks_B.shape[0], self.r
        ws, wp = self.weights(tasks_B)
        A = torch.einsum("bqs,qsdr->bqdr", ws, self.lora_A)
        Bm = torch.einsum("bqs,qsrd->bqrd", ws, self.lora_B)
        if wp is not None:
            A = A + torch.einsum("bqp,bqpdr->bqdr", wp, self.private_A[tasks_B])
            Bm = Bm + torch.einsum("bqp,bqprd->bqrd", wp, self.private_B[tasks_B])
        A = A.reshape(nB, self.in_features, r)
        Bm = Bm.transpose(1, 2).reshape(nB, r, self.out_features)
        return A.transpose(1, 2), Bm.transpose(1, 2)

    @torch.no_grad()
    def routing_weights(self):
        if not self.S:
            return None
        ws = torch.sigmoid(self.module_logits).view(-1, self.H, self.S)
        return normalise(ws)
