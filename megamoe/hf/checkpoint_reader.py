"""Find and read a megamoe checkpoint as ONE canonical full state dict + its config.

Accepted ``--checkpoint`` forms:
- a training ``save_dir`` (has ``latest``): the tag is ``--tag`` or the one ``latest`` names;
- one tag directory ``save_dir/global_stepN`` (has ``COMPLETE``);
- a canonical directory written by ``tools/convert_from_hf.py`` (``model.safetensors`` +
  ``megamoe_config.yaml``), or a canonical ``.safetensors`` file with the config beside it.

Why this is layout-free: the trainer writes ``model.safetensors`` into every tag directory,
gathered by the model's own ``gather_full_state_dict`` (all TP/EP shards merged into canonical
names), so any TP/EP/DP layout and ZeRO stage reads the same way. Under fp32 training the module
weights *are* the fp32 master weights. Under bf16/fp16 training they are rounded copies; when the
checkpoint has one model shard (TP=1, EP=1) the fp32 masters are recovered from the ZeRO
optimizer shards with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (its names equal
the module's, which ARE the canonical names at TP=EP=1); otherwise the export uses the rounded
weights and says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from megamoe.errors import UserError
from megamoe.utils import print0

CONFIG_FILE = "megamoe_config.yaml"
WEIGHTS_FILE = "model.safetensors"
_TAG = re.compile(r"^global_step(\d+)$")


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    config: dict  # the resolved run config as saved (model, moe, parallel, data, train sections)
    info: dict = field(default_factory=dict)  # step, tokens, valid_loss, data, source, run_name, notes


def _tags(save_dir: Path) -> list[str]:
    return sorted((p.name for p in save_dir.iterdir() if p.is_dir() and _TAG.match(p.name)),
                  key=lambda n: int(_TAG.match(n).group(1)))


def resolve(path: str | Path, tag: str | None = None) -> tuple[Path, Path]:
    """-> (directory holding the config, weights file). Raises UserError with what to do."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--checkpoint {path} does not exist")
    if path.is_file():
        if tag:
            raise UserError(f"--tag {tag!r} only applies to a checkpoint directory, not the file {path}")
        return path.parent, path
    if (path / "latest").is_file() or _tags(path):
        latest = (path / "latest").read_text().strip() if (path / "latest").is_file() else None
        if tag is None and latest is None:
            raise UserError(f"{path} has no 'latest' file; pass --tag (one of {_tags(path)})")
        if not (path / (tag or latest)).is_dir():
            what = f"--tag {tag!r}" if tag else f"the tag {latest!r} named by {path / 'latest'}"
            raise UserError(f"{what} not found in {path}; available tags: {_tags(path) or 'none'}")
        tag = tag or latest
        path = path / tag
    elif tag:
        raise UserError(f"--tag {tag!r} given but {path} is not a training save_dir (no 'latest' file)")
    deepspeed_files = list(path.glob("mp_rank_*_model_states.pt"))
    if deepspeed_files and not (path / "COMPLETE").is_file():
        raise UserError(f"checkpoint {path} is incomplete (no COMPLETE marker: the save was interrupted); "
                        "export an earlier tag with --tag")
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{path} has no {CONFIG_FILE}: not a megamoe checkpoint (or an incomplete one)")
    if not (path / WEIGHTS_FILE).is_file():
        raise UserError(f"{path} has no {WEIGHTS_FILE} (saved with train.save_full_model=false?); resume the run "
                        "for one step with train.save_full_model=true to write it, then export")
    return path, path / WEIGHTS_FILE


def _valid_loss(cfg: dict, step: int | None) -> float | None:
    """Last validation lm loss at or before ``step`` from the run's metrics.jsonl (if reachable)."""
    log_dir = (cfg.get("train") or {}).get("log_dir")
    if not log_dir or not (Path(log_dir) / "metrics.jsonl").is_file():
        return None
    best = None
    for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("split") == "valid" and "lm_loss" in r and (step is None or r.get("step", 0) <= step):
            if best is None or r.get("step", 0) >= best[0]:
                best = (r.get("step", 0), float(r["lm_loss"]))
    return None if best is None else best[1]


def _fp32_masters(d: Path, sd: dict[str, torch.Tensor], cfg: dict) -> tuple[dict[str, torch.Tensor], str]:
    par = cfg.get("parallel") or {}
    if par.get("tensor_parallel", 1) != 1 or par.get("expert_parallel", 1) != 1:
        return sd, (f"weights are the {next(iter(sd.values())).dtype} module weights: fp32 master weights are "
                    "recovered only for TP=1, EP=1 checkpoints")
    if not list(d.glob("*optim_states.pt")):
        return sd, "no ZeRO optimizer shards found: weights are the module weights"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    masters = get_fp32_state_dict_from_zero_checkpoint(str(d.parent), tag=d.name)
    out = {k: (masters[k].float() if k in masters and v.is_floating_point() else v) for k, v in sd.items()}
    n = sum(k in masters and v.is_floating_point() for k, v in sd.items())
    return out, f"fp32 master weights from the ZeRO optimizer shards ({n} of {len(sd)} tensors)"


def load_checkpoint(path: str | Path, tag: str | None = None) -> Checkpoint:
    from safetensors.torch import load_file

    d, weights = resolve(path, tag)
    cfg = yaml.safe_load((d / CONFIG_FILE).read_text()) or {}
    if "model" not in cfg:
        raise UserError(f"{d / CONFIG_FILE} has no 'model' section")
    try:
        sd = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise UserError(f"{weights} is not a readable safetensors file ({e}); the checkpoint is damaged") from None
    m = _TAG.match(d.name)
    step = int(m.group(1)) if m else None
    info = {"source": str(d), "step": step, "run_name": cfg.get("name")}
    notes = []
    train = cfg.get("train") or {}
    if train.get("precision", "fp32") != "fp32" and m:
        sd, note = _fp32_masters(d, sd, cfg)
        notes.append(note)
        print0(note)
    data = cfg.get("data") or {}
    if data.get("data_path"):
        info["data"] = ", ".join(map(str, data["data_path"]))
    if step is not None and train.get("global_batch_size") and data.get("seq_length"):
        info["tokens"] = step * train["global_batch_size"] * data["seq_length"]
    info["valid_loss"] = _valid_loss(cfg, step)
    info["notes"] = notes
    return Checkpoint(state_dict=sd, config=cfg, info=info)


def model_configs(cfg: dict):
    """(ModelConfig, MoEConfig) from a saved config dict (validated by the dataclass loader)."""
    from megamoe import config as mcfg
    from megamoe.model.config import ModelConfig, MoEConfig

    return mcfg.from_dict(ModelConfig, cfg.get("model") or {}), mcfg.from_dict(MoEConfig, cfg.get("moe") or {})
