"""Training section of the config (optimizer, schedule, batch sizes, checkpoints, logging)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megamoe.config import check


@dataclass(kw_only=True)
class TrainConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 8
    train_steps: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 1234

    def __post_init__(self):
        check(self.micro_batch_size > 0, "micro_batch_size", self.micro_batch_size, "must be > 0")
        check(self.global_batch_size > 0, "global_batch_size", self.global_batch_size, "must be > 0")
