"""Update rules for MPO central tensors (MPOE's fix for unbalanced optimisation: the shared
central tensor C gets gradient from every token, each expert's auxiliary tensors only from
their own tokens).

Modes (``moe.mpo.grad_mask``):

- ``none``: plain training.
- ``skip`` p (the paper's rule, MPOE figure ``images/mpoe.png`` (b) in RUCAIBox/MPO; no code for
  it was released): each optimizer step draws P_m; if P_m < p only the auxiliary tensors are
  updated. On a skipped step C is bit-identical afterwards and its optimizer state (AdamW
  moments and step count) is untouched: no momentum, no weight decay, no bias-correction tick.
  Its gradient is also zeroed, so the gradient norm and clipping see the auxiliary update only.
- ``bernoulli`` p (element-wise gradient mask; NOT the paper's rule): each element of C's
  gradient is zeroed with probability p, a fresh mask every optimizer step. Adam still moves the
  masked elements by their momentum and weight decay: this masks gradients, it skips nothing.
- ``freeze``: C gets ``requires_grad = False`` and is left out of the optimizer.
- a separate learning rate for C (any mode): :func:`param_groups` / the trainer's param groups
  put central tensors in their own group with ``lr * central_lr_scale``.

Use: ``mask = CentralGradMask(centrals, cfg)`` once; ``mask.set_step(step)`` before each
optimizer step's forward/backward (all micro-batches of a step share one draw), and
``mask.engine_step(engine)`` instead of ``engine.step()``.

Draws come from generators seeded by (seed, step, parameter index), so every rank draws the
same without communication. Gradient masks are tensor hooks, i.e. act on each rank's local
gradient BEFORE DeepSpeed's data-parallel reduction; that equals masking the reduced gradient
because the reduction is a (scaled) sum and the mask is identical on all ranks:
sum_r (m * g_r) = m * sum_r g_r (the same linearity covers gradient accumulation).

How ``skip`` skips under DeepSpeed: the optimizer does not step on the module's parameters but
on master copies (ZeRO-1/2: one flat fp32 partition per param group and DP rank; bf16/fp16
without ZeRO: flat fp32 groups; fp32 ZeRO-0: the parameters themselves), and a param group
cannot sit out one step. So on a skipped step :class:`_CentralSnapshot` copies, before
``engine.step()``, the central groups' masters, their optimizer state and the central module
parameters, and writes them back after it (state the step created is reset to zeros, which is
what AdamW's lazy init would create). This needs the central tensors in param groups of their
own, which megamoe/train/engine.py's ``param_groups`` builds; a group mixing central and other
parameters raises. Cost on a skipped step: one extra copy of C and of its two moments.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from megamoe.model.config import MPOConfig


def _seed(seed: int, step: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])


class CentralGradMask:
    def __init__(self, centrals: list[nn.Parameter], cfg: MPOConfig):
        self.centrals, self.mode, self.p, self.seed = list(centrals), cfg.grad_mask, cfg.grad_mask_p, cfg.grad_mask_seed
        self.step = 0
        self._masks: dict[int, torch.Tensor] = {}
        self._handles = []
        if self.mode == "freeze":
            for c in self.centrals:
                c.requires_grad_(False)
        elif self.mode in ("bernoulli", "skip"):
            for i, c in enumerate(self.centrals):
                self._handles.append(c.register_hook(lambda g, i=i: g * self.mask(i, g)))

    def set_step(self, step: int) -> None:
        if step != self.step:
            self.step, self._masks = step, {}

    def skipped(self, step: int | None = None) -> bool:
        """True when ``skip`` leaves the central tensors out of optimizer step ``step``."""
        if self.mode != "skip":
            return False
        g = torch.Generator().manual_seed(_seed(self.seed, self.step if step is None else step, 2**32 - 1))
        return bool(torch.rand((), generator=g) < self.p)

    def mask(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """The 0/1 gradient mask (same dtype/device as ``like``) of parameter ``index`` now."""
        if index not in self._masks:
            if self.mode == "bernoulli":
                g = torch.Generator().manual_seed(_seed(self.seed, self.step, index))
                m = torch.rand(like.shape, generator=g) >= self.p
            else:  # skip: one draw per step for all central tensors
                m = torch.full(like.shape, not self.skipped())
            self._masks[index] = m.to(device=like.device, dtype=like.dtype)
        return self._masks[index]

    def engine_step(self, engine) -> None:
        """``engine.step()``, keeping the central tensors and their optimizer state out of it
        on the optimizer steps that ``skip`` skips (non-boundary micro-batches just step). Under
        pipeline parallelism (``managed_gradient_accumulation: false``) every ``step()`` is the
        boundary: DeepSpeed's query answers True only while ``step()`` runs."""
        managed = getattr(engine, "managed_gradient_accumulation", lambda: True)()
        boundary = not managed or getattr(engine, "is_gradient_accumulation_boundary", lambda: True)()
        if not (boundary and self.skipped()):
            engine.step()
            return
        snap = _CentralSnapshot(engine, self.centrals)
        engine.step()
        snap.restore()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def optimizer_views(engine) -> tuple[torch.optim.Optimizer, list[list[nn.Parameter]]]:
    """(the torch optimizer that steps, module parameters of each of its param groups): DeepSpeed
    ZeRO-1/2 (``bit16_groups``), BF16_Optimizer (``bf16_groups``), FP16_Optimizer
    (``fp16_groups``), or a plain optimizer (engine.optimizer, or an optimizer itself)."""
    opt = getattr(engine, "optimizer", engine)
    inner = getattr(opt, "optimizer", opt)
    for name in ("bit16_groups", "bf16_groups", "fp16_groups"):
        groups = getattr(opt, name, None)
        if groups is not None and len(groups) == len(inner.param_groups):
            return inner, [list(g) for g in groups]
    return inner, [list(g["params"]) for g in inner.param_groups]


def central_group_indices(engine, centrals: list[nn.Parameter]) -> list[int]:
    inner, module_groups = optimizer_views(engine)
    ids = {id(c) for c in centrals}
    out = []
    for i, params in enumerate(module_groups):
        hits = sum(id(p) in ids for p in params)
        if hits and hits != len(params):
            raise RuntimeError(f"optimizer param group {i} mixes {hits} MPO central tensors with "
                               f"{len(params) - hits} other parameters; grad_mask=skip needs the central tensors "
                               "in groups of their own (megamoe.train.engine.param_groups builds them)")
        if hits:
            out.append(i)
    return out


class _CentralSnapshot:
    """Masters, optimizer state and module values of the central tensors, to put back after a
    step they must sit out (see the module docstring)."""

    def __init__(self, engine, centrals: list[nn.Parameter]):
        inner, _ = optimizer_views(engine)
        self.inner = inner
        masters = [p for i in central_group_indices(engine, centrals) for p in inner.param_groups[i]["params"]]
        self.masters = [(p, p.detach().clone()) for p in masters]
        self.states = [(p, {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inner.state[p].items()}
                        if p in inner.state else {}) for p in masters]
        self.module = [(c, c.detach().clone()) for c in centrals]

    @torch.no_grad()
    def restore(self) -> None:
        for p, v in self.masters + self.module:
            p.copy_(v)
        for p, before in self.states:
            now = self.inner.state.get(p, {})
            for k, v in now.items():
                old = before.get(k)
                if not torch.is_tensor(v):
                    now[k] = old if old is not None else type(v)(0)
                elif old is not None:
                    v.copy_(old)
                else:  # created by this step: reset to what AdamW's lazy init creates
                    v.zero_()


def is_central(name: str) -> bool:
    return name.endswith(".central")


def param_groups(model: nn.Module, lr: float, central_lr_scale: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups: central tensors (if trainable) with ``lr * central_lr_scale``, the rest
    with ``lr``. Frozen params (``requires_grad=False``) are left out entirely."""
    central, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (central if is_central(name) else rest).append(p)
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "default"}]
    if central:
        groups.append({"params": central, "lr": lr * central_lr_scale, "weight_decay": weight_decay,
                       "name": "mpo_central"})
    return groups
