"""Checkpoints: DeepSpeed ``save_checkpoint``/``load_checkpoint`` plus megamoe's own pieces.

Layout of ``save_dir``::

    latest                      tag of the newest COMPLETE checkpoint (written last, atomically)
    global_step{N}/             DeepSpeed files (model states from DP rank 0, ZeRO shards per rank)
        megamoe_experts_tp{t}_ep{e}.pt   local expert params of each (TP, EP) shard
        megamoe_rank{r}.pt               RNG states (python, numpy, torch) of global rank r
        megamoe_config.yaml              the full resolved config
        model.safetensors                canonical full state dict (train.save_full_model), loadable
                                         with any layout (tools/evaluate.py, HF export)
        COMPLETE                         marker, written after every rank finished

Traps / design:
- DeepSpeed itself writes ``latest`` at the end of ``save_checkpoint``, but before megamoe's
  own files exist, and without a rename; we pass ``save_latest=False`` and write ``latest``
  ourselves (temp file + rename) after a barrier, so a crash (even SIGKILL) mid-save leaves
  ``latest`` pointing at the previous complete checkpoint.
- DeepSpeed's model-states file is written by DP rank 0 only; with expert parallelism other
  EP ranks hold *different* experts, so each (TP, EP) shard's experts are saved separately
  (by its expert-data-parallel rank 0) and loaded back after DeepSpeed's load.
- ``client_state`` (consumed samples, step, counters, config) travels in DeepSpeed's model
  file; hash-router tables are module buffers, so they travel in the model state.
- Fault injection for tests: ``MEGAMOE_CRASH_IN_SAVE=N`` SIGKILLs this process in the middle
  of its N-th save of the run (after DeepSpeed wrote its files, before ``latest`` moved).
- Files are read with ``torch.load(weights_only=True)``: numpy's RNG state is converted to
  tensors/ints first.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megamoe import comm, parallel
from megamoe.errors import UserError
from megamoe.train.engine import is_expert_param
from megamoe.utils import atomic_write_text

_TAG = re.compile(r"^global_step(\d+)$")


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     gauss), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def read_latest(save_dir: str | Path) -> str | None:
    p = Path(save_dir) / "latest"
    return p.read_text().strip() if p.is_file() else None


def _expert_state(module) -> dict:
    names = {n for n, p in module.named_parameters() if is_expert_param(p)}
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k in names}


def save(engine, save_dir: str | Path, step: int, client_state: dict, config_dict: dict, keep_last: int,
         full_model: bool = True) -> str:
    """Collective: every rank calls it. Returns the tag."""
    save_dir = Path(save_dir)
    tag = f"global_step{step}"
    rank = dist.get_rank()
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if (save_dir / tag).exists():  # a partial save of a run that crashed: start clean
            shutil.rmtree(save_dir / tag)
    comm.barrier()
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
    d = save_dir / tag
    module = engine.module
    edp = parallel.expert_dp_group()
    if edp is None or dist.get_rank(group=edp) == 0:
        experts = _expert_state(module)
        if experts:
            torch.save(experts, d / f"megamoe_experts_tp{parallel.tp_rank()}_ep{parallel.ep_rank()}.pt")
    torch.save(rng_state(), d / f"megamoe_rank{rank}.pt")
    _maybe_crash()
    if full_model:
        from megamoe.model.state_dict import gather_full_state_dict
        from safetensors.torch import save_file

        if engine.zero_optimization_stage() == 3:  # parameters are partitioned: gather them first
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                full = gather_full_state_dict(module)
        else:
            full = gather_full_state_dict(module)  # collective
        if rank == 0:
            save_file({k: v.contiguous() for k, v in full.items()}, str(d / "model.safetensors"))
    if rank == 0:
        atomic_write_text(d / "megamoe_config.yaml", yaml.safe_dump(config_dict, sort_keys=False))
        atomic_write_text(d / "megamoe_meta.json", json.dumps(
            {"step": step, "dp_size": parallel.dp_size(), "tp_size": parallel.tp_size(), "ep_size": parallel.ep_size(),
             "zero_stage": engine.zero_optimization_stage()}))
    comm.barrier()
    if rank == 0:
        (d / "COMPLETE").write_text(tag + "\n")
        atomic_write_text(save_dir / "latest", tag)
        _prune(save_dir, keep_last)
    comm.barrier()
    return tag


_saves = 0


def _maybe_crash() -> None:
    global _saves
    _saves += 1
    if os.environ.get("MEGAMOE_CRASH_IN_SAVE") == str(_saves):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _prune(save_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    tags = sorted((int(m.group(1)), p) for p in save_dir.iterdir() if p.is_dir() and (m := _TAG.match(p.name)))
    latest = read_latest(save_dir)
    for _, p in tags[:-keep_last]:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


def resolve_load_dir(load: str | None, save_dir: str) -> str | None:
    """``train.load``: None -> fresh start; "auto" -> save_dir if it has a complete checkpoint."""
    if load is None:
        return None
    path = save_dir if load == "auto" else load
    if read_latest(path) is None:
        if load == "auto":
            return None
        raise UserError(f"train.load={load!r}: no 'latest' file in {path}; pass a directory that "
                        "pretrain_moe.py saved into (train.save_dir of that run)")
    return path


def check_compatible(saved: dict, current: dict, load_dir) -> None:
    """The checkpoint's model/moe sections must equal the run's (architecture can't change on
    resume); parallel/train/data may differ (e.g. another DP size or more steps)."""
    for section in ("model", "moe"):
        a, b = saved.get(section), current.get(section)
        if a != b:
            diff = sorted(k for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k))
            raise UserError(f"cannot resume from {load_dir}: {section}.{diff[0] if diff else '?'} differs "
                            f"(checkpoint {(a or {}).get(diff[0]) if diff else a!r} vs config "
                            f"{(b or {}).get(diff[0]) if diff else b!r}); resume with the checkpoint's "
                            f"{section} settings (see its megamoe_config.yaml)")


def load(engine, load_dir: str | Path) -> dict:
    """Collective. Restores model, optimizer, scheduler, expert shards and RNG; returns client_state."""
    load_dir = Path(load_dir)
    tag = read_latest(load_dir)
    d = load_dir / tag
    if not (d / "COMPLETE").is_file():
        raise UserError(f"checkpoint {d} is incomplete (no COMPLETE marker); 'latest' must name a complete save")
    # Not strict: DP rank 0's model file holds only ITS experts (global expert names), other EP
    # ranks take theirs from the expert shard files below. Model/moe config equality is checked
    # by the caller (check_compatible), so nothing else can be missing.
    meta_file = d / "megamoe_meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    same_dp = meta.get("dp_size", parallel.dp_size()) == parallel.dp_size() and \
        meta.get("zero_stage", engine.zero_optimization_stage()) == engine.zero_optimization_stage()
    if not same_dp and dist.get_rank() == 0:
        print(f"warning: {d} was saved with data-parallel size {meta.get('dp_size')} / ZeRO-{meta.get('zero_stage')}, "
              f"this run has {parallel.dp_size()} / ZeRO-{engine.zero_optimization_stage()}: DeepSpeed ZeRO-1/2 "
              "cannot repartition optimizer states, so weights, LR schedule, step and data position are restored "
              "and the AdamW moments restart from zero", flush=True)
    path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=False,
                                                load_optimizer_states=same_dp)
    if path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {d}")
    module = engine.module
    shard = d / f"megamoe_experts_tp{parallel.tp_rank()}_ep{parallel.ep_rank()}.pt"
    names = {n for n, p in module.named_parameters() if is_expert_param(p)}
    if names:
        if not shard.is_file():
            raise UserError(f"{shard} not found: the checkpoint was saved with a different tensor/expert-parallel "
                            "layout; resume with the same parallel.tensor_parallel and parallel.expert_parallel")
        experts = torch.load(shard, map_location="cpu", weights_only=True)
        missing = names - set(experts)
        if missing:
            raise UserError(f"{shard} lacks expert parameters {sorted(missing)[:3]}...: different model config")
        with torch.no_grad():
            params = dict(module.named_parameters())
            for k in names:
                params[k].copy_(experts[k])
        if not same_dp and hasattr(engine.optimizer, "_restore_from_bit16_weights"):
            engine.optimizer._restore_from_bit16_weights()  # fp32 masters from the experts just loaded
    rng_file = d / f"megamoe_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return client_state or {}
