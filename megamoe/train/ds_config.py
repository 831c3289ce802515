"""The DeepSpeed config dict, built from the YAML run config plus an optional JSON file.

Rule: the YAML is the source of truth for everything megamoe validates (batch sizes,
clipping, ZeRO stage, precision). A DeepSpeed JSON (``train.deepspeed_config``) may add
anything else (bucket sizes, overlap_comm, ...); when it repeats a YAML setting the values
must agree, otherwise :class:`ConfigError` names both places. Nothing is silently overridden.

Traps:
- The optimizer and LR schedule are built by megamoe (param groups for MoE / weight-decay /
  MPO central tensors), so ``optimizer`` and ``scheduler`` sections in the JSON are refused.
- A client optimizer under ZeRO needs ``zero_allow_untested_optimizer``.
"""

from __future__ import annotations

import json
from pathlib import Path

from megamoe.config import ConfigError
from megamoe.errors import UserError

# (json path, yaml path, getter) for every setting that exists in both places.
_SHARED = [
    ("train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    ("train_batch_size", "train.global_batch_size"),
    ("gradient_accumulation_steps", "train.global_batch_size / (train.micro_batch_size x DP)"),
    ("gradient_clipping", "train.grad_clip"),
    ("zero_optimization.stage", "train.zero_stage"),
    ("bf16.enabled", "train.precision"),
    ("fp16.enabled", "train.precision"),
]


def _get(d: dict, dotted: str):
    node = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
    d[parts[-1]] = value


def load_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"train.deepspeed_config={str(path)!r}: file not found; pick one of configs/deepspeed/*.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"train.deepspeed_config={str(path)!r}: not valid JSON ({e})") from None
    for section in ("optimizer", "scheduler"):
        if section in data:
            raise ConfigError(f"{path}:{section}", data[section],
                              "megamoe builds the optimizer and LR schedule itself (train.lr, train.lr_decay, "
                              "train.weight_decay ...): remove this section from the JSON")
    return data


def build_ds_config(train, dp: int, *, has_moe: bool, pipeline: bool = False) -> dict:
    """DeepSpeed config for ``train`` (a TrainConfig) at data-parallel size ``dp``. ``pipeline``:
    the pipeline schedule runs every backward itself and calls ``engine.step()`` once per
    optimizer step (``managed_gradient_accumulation: false``, megamoe/train/pipeline.py)."""
    gas = train.grad_accumulation(dp)
    ours: dict = {}
    _set(ours, "train_micro_batch_size_per_gpu", train.micro_batch_size)
    _set(ours, "train_batch_size", train.global_batch_size)
    _set(ours, "gradient_accumulation_steps", gas)
    _set(ours, "gradient_clipping", float(train.grad_clip))
    _set(ours, "zero_optimization.stage", train.zero_stage)
    _set(ours, "bf16.enabled", train.precision == "bf16")
    _set(ours, "fp16.enabled", train.precision == "fp16")

    user = load_json(train.deepspeed_config) if train.deepspeed_config else {}
    for json_key, yaml_key in _SHARED:
        theirs = _get(user, json_key)
        mine = _get(ours, json_key)
        if theirs is None or theirs == "auto":
            continue
        same = float(theirs) == float(mine) if isinstance(mine, (int, float)) and not isinstance(mine, bool) \
            else bool(theirs) == bool(mine)
        if not same:
            raise ConfigError(
                yaml_key, mine,
                f"disagrees with {json_key}={theirs!r} in {train.deepspeed_config}; set the same value in both "
                "places or remove it from the JSON (the YAML is the source of truth)")

    cfg = json.loads(json.dumps(user))  # deep copy
    for json_key, _ in _SHARED:
        _set(cfg, json_key, _get(ours, json_key))
    if train.precision == "fp16":
        fp16 = cfg.setdefault("fp16", {})
        fp16.setdefault("loss_scale", 0)  # dynamic loss scaling
        fp16.setdefault("initial_scale_power", 16)
        fp16.setdefault("loss_scale_window", 1000)
        fp16.setdefault("hysteresis", 2)
        fp16.setdefault("min_loss_scale", 1)
    if train.precision == "bf16" and train.zero_stage in (1, 2):
        # DeepSpeed skips the NaN check for bf16 unless asked: we want non-finite steps skipped.
        cfg["bf16"].setdefault("check_grad_overflow", True)
    zero = cfg["zero_optimization"]
    if train.zero_stage in (1, 2):
        zero.setdefault("contiguous_gradients", True)
        zero.setdefault("overlap_comm", False)
        zero.setdefault("reduce_scatter", True)
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 10**9)  # megamoe does its own logging
    cfg.setdefault("wall_clock_breakdown", False)
    cfg.setdefault("checkpoint", {}).setdefault("use_node_local_storage", False)
    if pipeline:
        cfg["managed_gradient_accumulation"] = False
    return cfg
