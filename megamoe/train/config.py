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
    """Optimizer, schedule, batch sizes, precision, ZeRO stage, checkpoints and logging."""

    micro_batch_size: int = 4
    """Sequences per rank per forward/backward."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks; the gradient accumulation is
    derived from it (global / (micro x DP)), never set."""
    train_steps: int = 100
    """Optimizer steps of the whole run (a resume continues up to it)."""
    lr: float = 3e-4
    """Peak learning rate (AdamW), reached after warmup_steps."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    warmup_steps: int = 10
    """Linear warmup from 0 to lr."""
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from lr to min_lr over the steps after warmup."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not for the groups excluded by no_decay_*)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    no_decay_norms: bool = True
    """Norm weights get weight_decay 0."""
    no_decay_biases: bool = True
    """Biases get weight_decay 0."""
    no_decay_embeddings: bool = True
    """Embeddings (token and position) get weight_decay 0."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; bf16/fp16 keep fp32 master weights (fp16 is GPU-only, refused on CPU)."""
    allow_tf32: bool = True
    """fp32 training on a GPU: matmuls in TF32 (10-bit mantissa products, fp32 accumulation), as
    Megatron and torchtitan train; false keeps full fp32 matmuls. No effect on CPU, bf16 or fp16."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (3 only for dense models: DeepSpeed's MoE does not support it)."""
    seed: int = 1234
    """Seed of the model initialisation and router jitter (the same on every rank)."""

    # evaluation
    eval_interval: int = 50
    """Evaluate on the valid split every this many steps (0 = only at the end)."""
    eval_iters: int = 10
    """Micro-batches per rank per evaluation."""

    # checkpoints
    save_dir: str = "runs/megamoe/checkpoints"
    """Where checkpoints (global_step{N}/ and `latest`) are written."""
    save_interval: int = 0
    """Save every this many steps (0 = only at the end and on SIGTERM/SIGUSR1)."""
    keep_last: int = 2
    """Keep the newest this many checkpoints (0 = keep all)."""
    load: str | None = None
    """Checkpoint directory to resume from; "auto" = save_dir if it has `latest`; null = start fresh."""
    save_full_model: bool = True
    """Also write model.safetensors (the full fp32 model under canonical names) in each checkpoint."""
    init_from: str | None = None
    """Start from these weights (a canonical full .safetensors, e.g. from convert_from_hf); ignored on resume."""

    # logging
    log_dir: str = "runs/megamoe/logs"
    """Where metrics.jsonl, TensorBoard events, summary.json and the loss curve go."""
    log_interval: int = 1
    """Log metrics every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard events under log_dir/tensorboard."""
    plot: bool = True
    """Write the loss-curve PNG at the end."""

    deepspeed_config: str | None = None
    """Optional DeepSpeed JSON for settings megamoe does not own (buckets, overlap); a value set
    in both places must agree, and optimizer/scheduler sections are refused."""

    # resilience
    max_nonfinite_in_a_row: int = 5
    """Stop with an error after this many optimizer steps in a row with a non-finite loss or gradient."""
    exit_after_steps: int = 0
    """>0: stop (and save) after this many steps of this run (time limits, tests); 0 = off."""

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
