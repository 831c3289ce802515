"""Training section of the config (optimizer, schedule, batch sizes, checkpoints, logging).

Batch arithmetic: ``global_batch_size = micro_batch_size x grad_accumulation x DP``; the
accumulation is *derived* (see :meth:`TrainConfig.grad_accumulation`), never set, so the three
can not disagree. Checked at start-up against the real DP size, naming the fields.

Settings that DeepSpeed also has (micro batch, global batch, accumulation, clipping, ZeRO
stage, precision) live here; a ``deepspeed_config`` JSON may repeat them only with the same
value (megamoe/train/ds_config.py raises an error naming both places otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megamoe.config import ConfigError, check


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
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    # Weight-decay exclusions (True = the group gets weight_decay=0).
    no_decay_norms: bool = True
    no_decay_biases: bool = True
    no_decay_embeddings: bool = True
    grad_clip: float = 1.0  # 0 = no clipping
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 2
    seed: int = 1234

    # evaluation
    eval_interval: int = 50  # 0 = only at the end
    eval_iters: int = 10  # micro-batches per rank per evaluation

    # checkpoints
    save_dir: str = "runs/megamoe/checkpoints"
    save_interval: int = 0  # 0 = only at the end (and on SIGTERM/SIGUSR1)
    keep_last: int = 2  # 0 = keep all
    load: str | None = None  # checkpoint dir to resume from; "auto" = save_dir if it has `latest`
    save_full_model: bool = True  # also write model.safetensors (canonical full state dict, any layout)
    init_from: str | None = None  # start from these weights (canonical full .safetensors); ignored on resume

    # logging
    log_dir: str = "runs/megamoe/logs"
    log_interval: int = 1
    tensorboard: bool = True
    plot: bool = True  # loss-curve PNG at the end

    # DeepSpeed JSON (optional); values present in both places must agree.
    deepspeed_config: str | None = None

    # resilience
    max_nonfinite_in_a_row: int = 5
    exit_after_steps: int = 0  # >0: stop (and save) after this many steps of THIS run (tests, time limits)

    def __post_init__(self):
        for name in ("micro_batch_size", "global_batch_size", "train_steps"):
            check(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        check(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size", self.global_batch_size,
              f"must be a multiple of train.micro_batch_size={self.micro_batch_size}")
        for name in ("eval_interval", "save_interval", "keep_last", "exit_after_steps"):
            check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        check(self.eval_iters > 0, "eval_iters", self.eval_iters, "must be > 0")
        check(self.log_interval > 0, "log_interval", self.log_interval, "must be > 0")
        check(self.max_nonfinite_in_a_row > 0, "max_nonfinite_in_a_row", self.max_nonfinite_in_a_row, "must be > 0")

    def grad_accumulation(self, dp: int) -> int:
        """Micro-batches per optimizer step per rank; raises naming the fields if inexact."""
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ConfigError("train.global_batch_size", self.global_batch_size,
                              f"must be a multiple of train.micro_batch_size x data-parallel size = "
                              f"{self.micro_batch_size} x {dp} = {per_step}")
        return self.global_batch_size // per_step
