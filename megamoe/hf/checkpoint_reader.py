"""Find and read a megamoe checkpoint as canonical tensors + its config (export, evaluate,
``train.init_from``, fine-tuning).

Accepted ``--checkpoint`` forms:
- a training ``save_dir`` (has ``latest``): the tag is ``--tag`` or the one ``latest`` names;
- one tag directory ``save_dir/global_stepN`` (has ``COMPLETE``);
- a canonical directory written by ``tools/convert_from_hf.py`` or ``tools/zero_to_fp32.py``
  (``model.safetensors`` + ``megamoe_config.yaml``), or such a ``.safetensors`` file.

Why this is layout-free and exact: a training checkpoint holds the canonical pieces of every
tensor (megamoe/train/universal.py), so its fp32 master weights, experts included, are read
back whatever TP/EP/DP layout and ZeRO stage wrote them, one tensor at a time. A tag directory
without shards (older format) falls back to its ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from megamoe.errors import UserError

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
    from megamoe.train.universal import SHARD_DIR

    if ((path / SHARD_DIR).is_dir() or list(path.glob("mp_rank_*_model_states.pt"))) and \
            not (path / "COMPLETE").is_file():
        raise UserError(f"checkpoint {path} is incomplete (no COMPLETE marker: the save was interrupted); "
                        "export an earlier tag with --tag")
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{path} has no {CONFIG_FILE}: not a megamoe checkpoint (or an incomplete one)")
    if (path / SHARD_DIR).is_dir():
        return path, path / SHARD_DIR
    if not (path / WEIGHTS_FILE).is_file():
        raise UserError(f"{path} has neither {SHARD_DIR}/ nor {WEIGHTS_FILE}: not a megamoe checkpoint")
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


@contextlib.contextmanager
def open_canonical(path: str | Path, tag: str | None = None, what: str = "--checkpoint"):
    """A lazy ``{canonical name: tensor}`` of a checkpoint dir or canonical .safetensors file;
    each tensor is read (and checked) when it is used. Damaged files -> UserError naming them."""
    from megamoe.model.state_dict import LazyDict
    from megamoe.train import universal as uni

    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {path} does not exist")
    weights = resolve(p, tag)[1] if p.is_dir() else p
    if weights.name == uni.SHARD_DIR:
        try:
            reader = uni.CheckpointReader(weights.parent)
        except uni.CheckpointDamaged as e:
            raise UserError(str(e)) from None
        sd = reader.state_dict("weight")
        yield LazyDict(sd.keys(), lambda k: _checked(lambda: sd[k]))
        return
    try:
        f = uni.open_safetensors(weights)
    except uni.CheckpointDamaged as e:
        raise UserError(str(e)) from None
    with f:
        yield LazyDict(list(f.keys()), lambda k: _checked(lambda: f.get_tensor(k), weights))


def _checked(fn, path=None):
    from megamoe.train import universal as uni

    try:
        return fn()
    except uni.CheckpointDamaged as e:
        raise UserError(str(e)) from None
    except Exception as e:
        if path is None:
            raise
        raise UserError(str(uni._damaged(path, str(e).splitlines()[0][:200]))) from None


def load_checkpoint(path: str | Path, tag: str | None = None) -> Checkpoint:
    d, weights = resolve(path, tag)
    cfg = yaml.safe_load((d / CONFIG_FILE).read_text()) or {}
    if "model" not in cfg:
        raise UserError(f"{d / CONFIG_FILE} has no 'model' section")
    with open_canonical(d if weights.name == "shards" else weights) as lazy:
        sd = {k: lazy[k] for k in lazy}
    m = _TAG.match(d.name)
    step = int(m.group(1)) if m else None
    info = {"source": str(d), "step": step, "run_name": cfg.get("name")}
    notes = []
    train = cfg.get("train") or {}
    if weights.name == "shards" and train.get("precision", "fp32") != "fp32":
        notes.append("fp32 master weights from the checkpoint's shards")
    data = cfg.get("data") or {}
    if data.get("data_path"):
        info["data"] = ", ".join(map(str, data["data_path"]))
    if step is not None and train.get("global_batch_size") and data.get("seq_length"):
        info["tokens"] = step * train["global_batch_size"] * data["seq_length"]
    info["valid_loss"] = _valid_loss(cfg, step)
    info["notes"] = notes
    return Checkpoint(state_dict=sd, config=cfg, info=info)


def tokenizer_of(cfg: dict) -> Path | None:
    """``data.tokenizer_model`` of the run config, else the tokenizer the dataset's metadata
    (``PREFIX.json``) records, as training itself resolves it (megamoe/data/gpt.py)."""
    from megamoe.data.indexed import read_meta, tokenizer_path_from_meta

    data = cfg.get("data") or {}
    if data.get("tokenizer_model"):
        return Path(data["tokenizer_model"])
    for prefix in data.get("data_path") or []:
        prefix = str(prefix)
        if not prefix or prefix.replace(".", "").isdigit():  # weights in a blended list
            continue
        meta = read_meta(prefix)
        if meta and meta.get("tokenizer", {}).get("path"):
            return tokenizer_path_from_meta(prefix, meta)
    return None


def model_configs(cfg: dict):
    """(ModelConfig, MoEConfig) from a saved config dict (validated by the dataclass loader)."""
    from megamoe import config as mcfg
    from megamoe.model.config import ModelConfig, MoEConfig

    return mcfg.from_dict(ModelConfig, cfg.get("model") or {}), mcfg.from_dict(MoEConfig, cfg.get("moe") or {})
