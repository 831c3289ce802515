"""Gradient mask on MPO central tensors (MPOE's fix for unbalanced optimisation: the shared
central tensor C gets gradient from every token, each expert's auxiliary tensors only from
their own tokens). The exact rule is open in the paper; megamoe offers:

- ``none``: plain training.
- ``bernoulli`` p: each element of C's gradient is zeroed with probability p, a fresh mask
  every optimizer step.
- ``step`` p: with probability p the whole of C's gradient is zeroed for that step.
- ``freeze``: C gets ``requires_grad = False`` and is left out of the optimizer, so it stays
  bit-identical (use :func:`param_groups`).
- a separate learning rate for C: :func:`param_groups` puts central tensors in their own
  group with ``lr * central_lr_scale``.

Use: ``mask = CentralGradMask(centrals, cfg)`` once; ``mask.set_step(step)`` before each
optimizer step's forward/backward (all micro-batches of a step share one mask).

Masks are drawn from a generator seeded by (seed, step, parameter index), so every rank
draws the same mask without communication. The mask is applied by a tensor hook, i.e. to
each rank's local gradient BEFORE DeepSpeed's data-parallel reduction. That equals masking
the reduced gradient the optimizer uses because the reduction is a (scaled) sum and the
mask is elementwise and identical on all ranks: sum_r (m * g_r) = m * sum_r g_r; the same
linearity covers gradient accumulation over micro-batches of one step.

Trap: zeroing a gradient is not skipping an update under Adam: momentum still moves C on a
masked step (and weight decay still applies). That is what "mask the gradient" means here;
for "never update", use ``freeze``.
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
        elif self.mode in ("bernoulli", "step"):
            for i, c in enumerate(self.centrals):
                self._handles.append(c.register_hook(lambda g, i=i: g * self.mask(i, g)))

    def set_step(self, step: int) -> None:
        if step != self.step:
            self.step, self._masks = step, {}

    def mask(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """The 0/1 mask (same dtype/device as ``like``) of parameter ``index`` at this step."""
        if index not in self._masks:
            g = torch.Generator().manual_seed(_seed(self.seed, self.step, index))
            if self.mode == "bernoulli":
                m = torch.rand(like.shape, generator=g) >= self.p
            else:  # step: one draw for the whole tensor (same draw on all params of this step)
                g.manual_seed(_seed(self.seed, self.step, 2**32 - 1))
                m = torch.full(like.shape, bool(torch.rand((), generator=g) >= self.p))
            self._masks[index] = m.to(device=like.device, dtype=like.dtype)
        return self._masks[index]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


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
