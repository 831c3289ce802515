"""Task-routed low-rank adapters: LoRA, Poly / MHR and C-Poly (methods.md section 4).

Every adapter wraps one linear (``AdaptedLinear``) and adds a delta computed from the
linear's input ``x``; it is a no-op at init because the B side starts at zero. Routing is at
the task level: the caller sets ``adapter.task_ids`` (a [B] long tensor, one id per example;
:func:`megamoe.finetune.inject.set_task_ids` does it for a whole model) and the adapter builds
one A and one B per example from the task's skill weights.

Why hand-written: peft has LoRA but no Poly/MHR/C-Poly/TensorPoly/MTA, and its LoRA does not
know megatron-core's ``(output, bias)`` return convention; one small family of modules keeps
the methods comparable (same init, same scaling, same delta path).

Layout: the native model feeds linears ``[S, B, D]`` (batch on dim 1) while a plain module
feeds ``[B, ..., D]``; ``batch_dim`` says which, and the adapter moves the batch to the front.
Legend: B batch, N tokens per example, I in-features, O out-features, r rank, S skills,
H MHR blocks, P private skills, T tasks.
"""

from __future__ import annotations

import math

import torch

from megamoe.finetune.config import AdapterConfig


def relaxed_bernoulli(logits: torch.Tensor, training: bool, temperature: float) -> torch.Tensor:
    """Skill-selection probabilities: Gumbel-sigmoid sample in training (logistic noise,
    temperature), plain sigmoid at eval (Polytropon's choice)."""
    if training:
        u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
        logits = (logits + torch.log(u) - torch.log1p(-u)) / temperature
    return torch.sigmoid(logits)


def in_out_features(base: torch.nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or a megatron-core Column/RowParallelLinear at TP=1."""
    if isinstance(base, torch.nn.Linear):
        return base.in_features, base.out_features
    if hasattr(base, "input_size") and hasattr(base, "output_size"):
        return base.input_size, base.output_size
    raise TypeError(f"cannot adapt {type(base).__name__}: expected nn.Linear or a megatron-core parallel linear")


class TaskAdapter(torch.nn.Module):
    """Base: holds the routing state. ``delta(x_BNI, y_BNO)`` returns the additive change."""

    def __init__(self, cfg: AdapterConfig, in_features: int, out_features: int):
        super().__init__()
        self.cfg, self.in_features, self.out_features = cfg, in_features, out_features
        self.task_ids: torch.Tensor | None = None
        self.batch_dim = 0

    def _tasks(self, B: int) -> torch.Tensor:
        if self.task_ids is None:
            raise RuntimeError("adapter has no task ids: call set_task_ids(model, task_ids) before forward")
        if self.task_ids.shape != (B,):
            raise RuntimeError(f"task_ids has shape {tuple(self.task_ids.shape)}, the batch has {B} examples")
        return self.task_ids

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_BNI = x.movedim(self.batch_dim, 0)
        y_BNO = y.movedim(self.batch_dim, 0)
        B = x_BNI.shape[0]
        d = self.delta(x_BNI.reshape(B, -1, x.shape[-1]), y_BNO.reshape(B, -1, y.shape[-1]))
        return y + d.reshape(y_BNO.shape).movedim(0, self.batch_dim).to(y.dtype)

    def delta(self, x_BNI: torch.Tensor, y_BNO: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def lora_apply(x_BNI, A_BrI, B_BOr, scale: float) -> torch.Tensor:
    return scale * torch.einsum("bnr,bor->bno", torch.einsum("bni,bri->bnr", x_BNI, A_BrI), B_BOr)


def lora_init_(A: torch.Tensor) -> None:
    """A like nn.Linear / LoRA (kaiming-uniform, a=sqrt(5)) row by row over the in-features."""
    bound = 1.0 / math.sqrt(A.shape[-1])
    torch.nn.init.uniform_(A, -bound, bound)


class LoRA(TaskAdapter):
    """``W x + (alpha/r) B A x``; A random, B zero; shared by all tasks."""

    def __init__(self, cfg: AdapterConfig, in_features: int, out_features: int):
        super().__init__(cfg, in_features, out_features)
        self.lora_A = torch.nn.Parameter(torch.empty(cfg.rank, in_features))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, cfg.rank))
        lora_init_(self.lora_A)
        self.scale = cfg.alpha / cfg.rank

    def delta(self, x_BNI, y_BNO):
        return self.scale * (x_BNI @ self.lora_A.t()) @ self.lora_B.t()


class PolyLoRA(TaskAdapter):
    """Poly / MHR / C-Poly: per task, A and B are weighted mixtures of LoRA skills.

    Shared inventory of S skills (all tasks) plus P private skills per task (C-Poly; P=0 is
    Poly). Assignment logits init U(-1e-3, 1e-3); weights = relaxed Bernoulli (training) or
    sigmoid (eval), normalised to sum 1 (see ``cpoly_normalize``). MHR (``num_splits`` H>1)
    splits A's in-features and B's out-features into H blocks, each with its own weights.
    """

    def __init__(self, cfg: AdapterConfig, in_features: int, out_features: int, private_skills: int = 0):
        super().__init__(cfg, in_features, out_features)
        H, S, P, r, T = cfg.num_splits, cfg.num_skills, private_skills, cfg.rank, cfg.num_tasks
        if in_features % H or out_features % H:
            from megamoe.config import ConfigError
            raise ConfigError("num_splits", H, f"must divide the adapted layer's in ({in_features}) and "
                              f"out ({out_features}) features")
        self.H, self.P, self.scale = H, P, cfg.alpha / r
        self.skills_A = torch.nn.Parameter(torch.empty(S, r, in_features))
        self.skills_B = torch.nn.Parameter(torch.zeros(S, out_features, r))
        self.skill_logits = torch.nn.Parameter(torch.empty(T, H, S).uniform_(-1e-3, 1e-3))
        lora_init_(self.skills_A)
        if P:
            self.private_A = torch.nn.Parameter(torch.empty(T, P, r, in_features))
            self.private_B = torch.nn.Parameter(torch.zeros(T, P, out_features, r))
            lora_init_(self.private_A)
            if cfg.cpoly_route_private:
                self.private_logits = torch.nn.Parameter(torch.empty(T, H, P).uniform_(-1e-3, 1e-3))

    def weights(self, tasks_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(shared [B,H,S], private [B,H,P] or None), normalised per ``cpoly_normalize``."""
        cfg, eps = self.cfg, 1e-12
        ws_BHS = relaxed_bernoulli(self.skill_logits[tasks_B], self.training, cfg.temperature)
        if not self.P:
            return ws_BHS / (ws_BHS.sum(-1, keepdim=True) + eps), None
        if cfg.cpoly_route_private:
            wp_BHP = relaxed_bernoulli(self.private_logits[tasks_B], self.training, cfg.temperature)
        else:
            wp_BHP = ws_BHS.new_ones(ws_BHS.shape[0], self.H, self.P)
        if cfg.cpoly_normalize == "joint":
            z = ws_BHS.sum(-1, keepdim=True) + wp_BHP.sum(-1, keepdim=True) + eps
            return ws_BHS / z, wp_BHP / z
        return ws_BHS / (ws_BHS.sum(-1, keepdim=True) + eps), wp_BHP / (wp_BHP.sum(-1, keepdim=True) + eps)

    def factors(self, tasks_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example A [B, r, I] and B [B, O, r]."""
        H = self.H
        S, r, I = self.skills_A.shape
        O = self.skills_B.shape[1]
        ws_BHS, wp_BHP = self.weights(tasks_B)
        A = torch.einsum("bhs,srhk->brhk", ws_BHS, self.skills_A.view(S, r, H, I // H))
        Bm = torch.einsum("bhs,shor->bhor", ws_BHS, self.skills_B.view(S, H, O // H, r))
        if wp_BHP is not None:
            nB, P = tasks_B.shape[0], self.P
            pA = self.private_A[tasks_B].view(nB, P, r, H, I // H)
            pB = self.private_B[tasks_B].view(nB, P, H, O // H, r)
            A = A + torch.einsum("bhp,bprhk->brhk", wp_BHP, pA)
            Bm = Bm + torch.einsum("bhp,bphor->bhor", wp_BHP, pB)
        return A.reshape(-1, r, I), Bm.reshape(-1, O, r)

    def delta(self, x_BNI, y_BNO):
        A_BrI, B_BOr = self.factors(self._tasks(x_BNI.shape[0]))
        return lora_apply(x_BNI, A_BrI, B_BOr, self.scale)


class AdaptedLinear(torch.nn.Module):
    """A frozen base linear plus an adapter on its output. Keeps the base's return
    convention: a tensor for nn.Linear, ``(output, bias)`` for megatron-core linears."""

    def __init__(self, base: torch.nn.Module, adapter: TaskAdapter):
        super().__init__()
        self.base, self.adapter = base, adapter

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        if isinstance(out, tuple):
            return (self.adapter(x, out[0]),) + tuple(out[1:])
        return self.adapter(x, out)


def build_adapter(cfg: AdapterConfig, in_features: int, out_features: int) -> TaskAdapter:
    if cfg.method == "lora":
        return LoRA(cfg, in_features, out_features)
    if cfg.method == "poly":
        return PolyLoRA(cfg, in_features, out_features, private_skills=0)
    if cfg.method == "cpoly":
        return PolyLoRA(cfg, in_features, out_features, private_skills=cfg.private_skills)
    if cfg.method in ("tensorpoly1", "tensorpoly2"):
        from megamoe.finetune.tensorpoly import TensorPoly
        return TensorPoly(cfg, in_features, out_features)
    from megamoe.finetune.mta import MTA
    return MTA(cfg, in_features, out_features)


def wrap(base: torch.nn.Module, cfg: AdapterConfig) -> AdaptedLinear:
    i, o = in_out_features(base)
    return AdaptedLinear(base, build_adapter(cfg, i, o))
