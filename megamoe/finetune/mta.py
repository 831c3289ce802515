"""Mixture-of-Task-Adapters (ALTER, seed 001): ``h + sum_e g_e Adapter_e(h)``.

One bottleneck adapter per task (h -> GELU(h W_down + b) W_up + b, D -> m -> D, W_up and its
bias zero so the layer is unchanged at init), applied to the output h of the wrapped linear.
The router is task-level (``mta_router="task"``): a learned [T, E] logit table, softmax over
the E adapters; ``mta_router_init`` favours each task's own adapter.

Stages (``stage`` attribute; :func:`megamoe.finetune.inject.set_mta_stage` flips a model):
- ``"one"``: adapters and router trained together on the mixture (the single-stage baseline);
- ``1``: each example uses only its own task's adapter (g = one-hot), router unused;
- ``2``: adapters frozen, router trained on the mixture.
Freezing is done by ``set_mta_stage`` through ``requires_grad``; the forward only picks the
mixing rule, so a frozen adapter also gets no gradient from stage-2 losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamoe.finetune.adapters import TaskAdapter
from megamoe.finetune.config import AdapterConfig


class MTA(TaskAdapter):
    def __init__(self, cfg: AdapterConfig, in_features: int, out_features: int):
        super().__init__(cfg, in_features, out_features)
        E, m, D = cfg.num_tasks, cfg.bottleneck, out_features
        self.down = torch.nn.Parameter(torch.randn(E, m, D) * D ** -0.5)
        self.down_bias = torch.nn.Parameter(torch.zeros(E, m))
        self.up = torch.nn.Parameter(torch.zeros(E, D, m))
        self.up_bias = torch.nn.Parameter(torch.zeros(E, D))
        self.router = torch.nn.Parameter(torch.eye(cfg.num_tasks, E) * cfg.mta_router_init)
        self.stage: str | int = "one"

    def adapter_params(self):
        return [self.down, self.down_bias, self.up, self.up_bias]

    def gates(self, tasks_B: torch.Tensor) -> torch.Tensor:
        """g [B, E]: one-hot own task in stage 1, softmax of the task's router row otherwise."""
        if self.stage == 1:
            return F.one_hot(tasks_B, self.down.shape[0]).to(self.down.dtype)
        return torch.softmax(self.router[tasks_B], dim=-1)

    def delta(self, x_BNI, y_BNO):
        tasks_B = self._tasks(y_BNO.shape[0])
        h_BNEm = F.gelu(torch.einsum("bnd,emd->bnem", y_BNO, self.down) + self.down_bias)
        out_BNED = torch.einsum("bnem,edm->bned", h_BNEm, self.up) + self.up_bias
        return torch.einsum("be,bned->bnd", self.gates(tasks_B), out_BNED)
