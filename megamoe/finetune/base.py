"""Shared pieces of the hand-written task-routed adapters (C-Poly, TensorPoly, MTA).

Every hand-written adapter is a :class:`TaskAdapter`; ``inject.py`` holds the one factory
that builds them (and PEFT's LoRA / Poly, which megamoe uses outright). This module imports
none of the adapter modules, so ``adapters.py``, ``tensorpoly.py`` and ``mta.py`` import it and
not each other.

Routing is at the task level: the caller sets ``task_ids`` (a [B] long tensor, one id per
example; :func:`megamoe.finetune.inject.set_task_ids` does it for a whole model).

Conventions (all LoRA-family methods, so equal-size comparisons are equal):
- the delta is ``scale * x A^T B^T`` with ``scale = alpha / rank`` and one ``alpha`` for every
  method (default 1: the official Poly / TensorPoly scale ``1/r``, PEFT ``tuners/poly/layer.py``
  and mttl ``mttl/models/poly.py``; PEFT's LoRA gets ``lora_alpha=alpha``);
- routing logits are named ``module_logits`` (as in PEFT and mttl) or ``router_logits`` (MTA),
  and :func:`param_groups` puts them in their own optimizer group (mttl
  ``mttl/models/get_optimizer.py``: group ``module_logits`` at ``module_logits_learning_rate``,
  default 0.1 in ``mttl/arguments.py``, no weight decay).

Legend: B batch, N tokens per example, I in-features, O out-features, r rank, S skills,
H MHR blocks, P private skills, T tasks.
"""

from __future__ import annotations

import math

import torch

ROUTING_NAMES = ("module_logits", "router_logits")
EPS = 1e-12  # PEFT / mttl: weights / (sum + 1e-12)


def is_routing_param(name: str) -> bool:
    """True for task-routing logits: ours (``module_logits``/``router_logits``) and PEFT Poly's
    (``poly_router.<adapter>.module_logits``)."""
    return any(part in ROUTING_NAMES for part in name.split("."))


def param_groups(model: torch.nn.Module, lr: float, routing_lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Trainable parameters in two AdamW groups: adapters + head at ``lr``, routing logits at
    ``routing_lr`` with no weight decay. Empty groups are dropped (LoRA has no routing)."""
    routing, rest = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (routing if is_routing_param(n) else rest).append(p)
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "adapters"},
              {"params": routing, "lr": routing_lr, "weight_decay": 0.0, "name": "routing"}]
    return [g for g in groups if g["params"]]


def relaxed_bernoulli(logits: torch.Tensor, training: bool, temperature: float = 1.0,
                      sample: bool = True) -> torch.Tensor:
    """Skill-selection probabilities: ``RelaxedBernoulli(temperature, logits).rsample()`` in
    training (as PEFT's ``PolyRouter``; the same draw order, so a seeded run matches PEFT's),
    plain sigmoid at eval or when ``sample`` is False (the TensorPoly "SOTA" configs'
    ``module_logits_relaxed_bernoulli: false``)."""
    if training and sample:
        return torch.distributions.RelaxedBernoulli(torch.tensor(temperature), logits=logits).rsample()
    return torch.sigmoid(logits)


def normalise(w: torch.Tensor) -> torch.Tensor:
    return w / (w.sum(-1, keepdim=True) + EPS)


def lora_init_(A: torch.Tensor) -> None:
    """A like nn.Linear / LoRA: kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), fan_in = last dim."""
    bound = 1.0 / math.sqrt(A.shape[-1])
    torch.nn.init.uniform_(A, -bound, bound)


def lora_apply(x_BNI: torch.Tensor, A_BrI: torch.Tensor, B_BOr: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * torch.einsum("bnr,bor->bno", torch.einsum("bni,bri->bnr", x_BNI, A_BrI), B_BOr)


def routing_entropy(w: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of normalised weights over the last dim."""
    p = w / w.sum(-1, keepdim=True).clamp_min(EPS)
    return -(p * p.clamp_min(EPS).log()).sum(-1).mean()


class TaskAdapter(torch.nn.Module):
    """Base: routing state and the [B, ..., D] -> [B, N, D] reshaping. ``delta(x_BNI)`` returns
    the additive change for a linear's input ``x`` (subclasses of :class:`AdaptedLinear`) or a
    layer's output (MTA)."""

    def __init__(self, cfg, in_features: int, out_features: int):
        super().__init__()
        self.cfg, self.in_features, self.out_features = cfg, in_features, out_features
        self.task_ids: torch.Tensor | None = None

    def _tasks(self, B: int) -> torch.Tensor:
        if self.task_ids is None:
            raise RuntimeError("adapter has no task ids: call set_task_ids(model, task_ids) before forward")
        if self.task_ids.shape != (B,):
            raise RuntimeError(f"task_ids has shape {tuple(self.task_ids.shape)}, the batch has {B} examples")
        return self.task_ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        return self.delta(x.reshape(B, -1, x.shape[-1])).reshape(*x.shape[:-1], -1)

    def delta(self, x_BNI: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def routing_weights(self) -> torch.Tensor | None:
        """Eval-mode routing weights of every task, [T, ..., S] normalised, for the entropy check."""
        return None


class LowRankAdapter(TaskAdapter):
    """A LoRA-family adapter: per example A [B, r, I] and B [B, O, r] from ``factors``."""

    def factors(self, tasks_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def delta(self, x_BNI):
        A_BrI, B_BOr = self.factors(self._tasks(x_BNI.shape[0]))
        return lora_apply(x_BNI, A_BrI.to(x_BNI.dtype), B_BOr.to(x_BNI.dtype), self.scale)

    @torch.no_grad()
    def task_delta_weight(self, task: int) -> torch.Tensor:
        """[O, I] weight change of one task at eval routing: merging it into the base linear
        gives a plain model specialised to that task."""
        was = self.training
        self.eval()
        A, B = self.factors(torch.tensor([task]))
        self.train(was)
        return self.scale * B[0] @ A[0]


class AdaptedLinear(torch.nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank adapter on its input: ``base(x) + adapter(x)``."""

    def __init__(self, base: torch.nn.Linear, adapter: LowRankAdapter):
        super().__init__()
        self.base, self.adapter = base, adapter

    def forward(self, x):
        return self.base(x) + self.adapter(x).to(x.dtype)
