"""Checkpoints that any layout can resume: megamoe's universal format (megamoe/train/universal.py).

Layout of ``save_dir``::

    latest                       tag of the newest COMPLETE checkpoint (written last, atomically)
    zero_to_fp32.py              megamoe's consolidation script (tools/zero_to_fp32.py), where
                                 DeepSpeed users look for DeepSpeed's
    global_step{N}/
        shards/rank{r}.safetensors   rank r's pieces of canonical tensors: fp32 masters, AdamW
        shards/rank{r}.json          moments, buffers (hash tables, router state); index + CRC-32
        megamoe_rank{r}.pt           RNG states (python, numpy, torch) of global rank r
        megamoe_state.json           step, consumed samples, LR schedule, engine counters, config
        megamoe_config.yaml          the full resolved config
        megamoe_meta.json            the layout that wrote it (TP, EP, DP, ZeRO stage, format)
        model.safetensors            (train.save_full_model) the full fp32 model, streamed from the
                                     shards one tensor at a time, each rank writing 1 / world of it
        COMPLETE                     marker, written after every rank finished

Resume under another layout (TP, EP, DP size, ZeRO stage 0-3): every rank rebuilds its local
tensors from the canonical ones with the model's own ``load_full`` (one canonical tensor at a
time), then sets its optimizer fragments (megamoe/train/fragments.py). DeepSpeed's
``save_checkpoint`` / ``load_checkpoint`` are not used. Which format and why: megamoe's own
canonical per-parameter format, because DeepSpeed's universal checkpoint (``ds_to_universal`` /
``load_universal_checkpoint``) cannot express expert parallelism (DeepSpeed #5716) nor megamoe's
stacked / transposed expert tensors, and ``torch.distributed.checkpoint`` would need DTensor
placements for DeepSpeed's flat ZeRO partitions (details in universal.py's docstring). The
per-parameter fp32 masters and moments are DeepSpeed's own (``_hp_mapping``, as read by
``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``), without their all-reduce.

Scaling: no rank gathers anything. Each rank writes only its own ZeRO fragments of its own
TP/EP shards (replicas, e.g. a norm weight on every TP rank, are written once: the lowest rank
holding an identical piece writes it), each tensor streamed to the file from the memory it lives
in. The piece map is built once per run (:func:`prepare`, collective) and cached.

Traps / design:
- SIGKILL safety: ``latest`` is replaced (temp file + rename) only after a barrier that every
  rank reaches after writing its files, and after ``COMPLETE``; a crash mid-save leaves
  ``latest`` at the previous complete checkpoint. A partial ``global_stepN`` of a crashed run is
  removed by the next save of the same step.
- Damaged files: every rank validates every shard's header and size before loading, and each
  tensor's CRC-32 as it is read; any failure becomes ONE UserError naming the file on every
  rank (the failing file's index is agreed over all ranks, so no rank hangs or differs).
- Fault injection for tests: ``MEGAMOE_CRASH_IN_SAVE=N`` SIGKILLs this process in the middle
  of its N-th save of the run (after its shard files, before ``latest`` moved).
- RNG files are restored only when the world size is the same (ranks map one to one).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megamoe import comm, parallel
from megamoe.errors import UserError
from megamoe.train import universal as uni
from megamoe.train.fragments import ensure_optimizer_state, fragment
from megamoe.utils import atomic_write_text

_TAG = re.compile(r"^global_step(\d+)$")
STATE_FILE = "megamoe_state.json"
CONFIG_FILE = "megamoe_config.yaml"
SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "zero_to_fp32.py"


def rng_state() -> dict:
    """Every generator a step draws from. ``cuda``: this rank's device generator (router jitter
    and anything else drawn on the GPU), absent when CUDA is unused."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # a checkpoint from CPU resumes on GPU and back
        torch.cuda.set_rng_state(state["cuda"])


def read_latest(save_dir: str | Path) -> str | None:
    p = Path(save_dir) / "latest"
    return p.read_text().strip() if p.is_file() else None


# ---- what this rank writes ----------------------------------------------------------------

class _Plan:
    """This rank's writes: (local tensor, piece, lo, hi, fragment or None) with [lo, hi) an
    element range of the piece's box (in local order)."""

    def __init__(self, writes, layout):
        self.writes, self.layout = writes, layout


def prepare(engine) -> _Plan:
    """Collective, once per run: the piece map of every local tensor and who writes what."""
    plan = getattr(engine, "_megamoe_plan", None)
    if plan is not None:
        return plan
    from megamoe.model.state_dict import local_layout

    layout = local_layout(engine.module)
    cand = []
    for lt in layout:
        frag = fragment(engine.optimizer, lt.tensor) if lt.is_param else None
        if lt.is_param and frag is None:
            continue
        fs, fe = (frag.start, frag.stop) if frag is not None else (0, lt.tensor.numel())
        for pc in lt.pieces:
            lo, hi = max(pc.start, fs), min(pc.stop, fe)
            if lo < hi:
                cand.append((lt, pc, lo - pc.start, hi - pc.start, frag))
    # replicas (same piece and range on several ranks) are written by the lowest such rank
    fps = torch.tensor([pc.fingerprint(lo, hi) for _, pc, lo, hi, _ in cand], dtype=torch.long)
    n = torch.tensor([len(cand)], dtype=torch.long)
    counts = [int(c) for c in comm.all_gather(n)]
    padded = torch.full((max(counts),), -1, dtype=torch.long)
    padded[: len(cand)] = fps
    allfp = comm.all_gather(padded)
    rank = dist.get_rank()
    lower = set()
    for r in range(rank):
        lower.update(allfp[r][: counts[r]].tolist())
    writes = [c for c, fp in zip(cand, fps.tolist()) if fp not in lower]
    plan = _Plan(writes, layout)
    engine._megamoe_plan = plan
    return plan


def _entries(plan: _Plan):
    """(safetensors entries, json tensor records, steps) of this rank's writes."""
    entries, records, steps = [], [], {}
    for i, (lt, pc, lo, hi, frag) in enumerate(plan.writes):
        base = {"key": pc.key, "shape": list(pc.shape), "box": [list(map(list, r)) for r in pc.box],
                "perm": list(pc.perm), "range": [lo, hi], "param": lt.is_param}
        if frag is None:  # a buffer: its value, its dtype
            t = lt.tensor
            fetch = (lambda t=t, a=pc.start + lo, b=pc.start + hi: t.detach().reshape(-1)[a:b])
            states = [("weight", t.dtype, fetch)]
        else:
            a, b = pc.start + lo - frag.start, pc.start + hi - frag.start
            states = [(s, torch.float32, (lambda s=s, f=frag, a=a, b=b: f.get(s)[a:b].float()))
                      for s in uni.STATES if frag.get(s) is not None]
            st = frag.step()
            if st is not None:
                steps[pc.key] = st
        for s, dtype, fetch in states:
            name = f"{i}.{s}"
            entries.append((name, dtype, (hi - lo,), fetch))
            records.append(dict(base, name=name, state=s, dtype=uni.dtype_name(dtype)))
    return entries, records, steps


def save(engine, save_dir: str | Path, step: int, client_state: dict, config_dict: dict, keep_last: int,
         full_model: bool = True, scheduler=None) -> str:
    """Collective: every rank calls it. Returns the tag."""
    save_dir = Path(save_dir)
    tag = f"global_step{step}"
    d = save_dir / tag
    rank = dist.get_rank()
    plan = prepare(engine)
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if d.exists():  # a partial save of a run that crashed: start clean
            shutil.rmtree(d)
        (d / uni.SHARD_DIR).mkdir(parents=True)
    comm.barrier()
    entries, records, steps = _entries(plan)
    shard = d / uni.SHARD_DIR / f"rank{rank:05d}.safetensors"
    crcs = uni.write_safetensors(shard, entries, {"format": uni.FORMAT, "rank": rank})
    for r in records:
        r["crc32"] = crcs[r["name"]]
    atomic_write_text(shard.with_suffix(".json"), json.dumps(
        {"format": uni.FORMAT, "rank": rank, "world": dist.get_world_size(), "file": shard.name,
         "size": shard.stat().st_size, "tensors": records,
         "steps": steps}))
    torch.save(rng_state(), d / f"megamoe_rank{rank}.pt")
    _maybe_crash()
    comm.barrier()
    if full_model:  # every rank writes its share: no rank works alone while the others wait
        uni.consolidate(d, d / "model.safetensors", rank=rank, world=dist.get_world_size(), barrier=comm.barrier)
    if rank == 0:
        sched = {"last_epoch": scheduler.last_epoch, "_step_count": scheduler._step_count} if scheduler else None
        counters = {k: int(getattr(engine, k, 0)) for k in ("global_steps", "global_samples", "skipped_steps")}
        atomic_write_text(d / STATE_FILE, json.dumps({"client_state": client_state, "scheduler": sched,
                                                      "engine": counters}))
        atomic_write_text(d / CONFIG_FILE, yaml.safe_dump(config_dict, sort_keys=False))
        atomic_write_text(d / "megamoe_meta.json", json.dumps(
            {"format": uni.FORMAT, "step": step, "world": dist.get_world_size(), "dp_size": parallel.dp_size(),
             "tp_size": parallel.tp_size(), "ep_size": parallel.ep_size(), "pp_size": parallel.pp_size(),
             "zero_stage": engine.zero_optimization_stage()}))
        _write_script(save_dir)
        (d / "COMPLETE").write_text(tag + "\n")
        atomic_write_text(save_dir / "latest", tag)
        _prune(save_dir, keep_last)
    comm.barrier()
    return tag


def _write_script(d: Path) -> None:
    """The save dir's ``zero_to_fp32.py``: megamoe's tool, told where megamoe lives."""
    text = SCRIPT.read_text().replace('MEGAMOE_ROOT = None', f'MEGAMOE_ROOT = {str(SCRIPT.parents[1])!r}', 1)
    atomic_write_text(d / "zero_to_fp32.py", text)


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
    resume); parallel/train/data may differ (e.g. another layout or more steps)."""
    for section in ("model", "moe"):
        a, b = saved.get(section), current.get(section)
        if a != b:
            diff = _first_diff(a or {}, b or {})
            raise UserError(f"cannot resume from {load_dir}: {section}.{diff[0]} differs (checkpoint {diff[1]!r} vs "
                            f"config {diff[2]!r}); resume with the checkpoint's {section} settings (see its "
                            f"{CONFIG_FILE})")


def _first_diff(a, b, path=""):
    """(dotted path, a value, b value) of the first differing leaf."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_diff(a.get(k), b.get(k), f"{path}{k}.")
    return path.rstrip(".") or "?", a, b


# ---- load ---------------------------------------------------------------------------------

@torch.no_grad()
def _local_values(model, sd, params) -> dict:
    """Full local (TP/EP-shard) fp32 values of ``params`` from a canonical (lazy) state dict, via
    the model's own loading code; buffers are loaded in place on the way."""
    from megamoe.model.state_dict import load_full_state_dict, local_shape

    saved = [p.data for p in params]
    for p in params:
        p.data = torch.zeros(local_shape(p), dtype=torch.float32, device=p.device)
    try:
        load_full_state_dict(model, sd)
        return {id(p): p.data for p in params}
    finally:
        for p, d in zip(params, saved):
            p.data = d


def _load_states(engine, reader, plan) -> None:
    module, opt = engine.module, engine.optimizer
    params = [lt.tensor for lt in plan.layout if lt.is_param]
    frags = {id(p): fragment(opt, p) for p in params}
    vals = _local_values(module, reader.state_dict("weight"), params)
    for p in params:
        v = vals[id(p)]
        f = frags[id(p)]
        if not hasattr(p, "ds_id"):
            p.data.copy_(v.to(p.dtype))
        if f is not None:
            f.set("weight", v.reshape(-1)[f.start:f.stop])
    del vals
    if not reader.has("exp_avg"):
        return
    ensure_optimizer_state(opt)
    frags = {id(p): fragment(opt, p) for p in params}  # after linking the moment views
    for state in ("exp_avg", "exp_avg_sq"):
        vals = _local_values(module, reader.state_dict(state), params)
        for p in params:
            f = frags[id(p)]
            if f is not None:
                f.set(state, vals[id(p)].reshape(-1)[f.start:f.stop])
        del vals
    steps = {}
    for lt in plan.layout:
        f = frags.get(id(lt.tensor)) if lt.is_param else None
        if f is not None:
            got = {reader.step(pc.key) for pc in lt.pieces} - {None}
            if got:
                steps[id(f)] = (f, max(got))
    for f, s in steps.values():
        f.set_step(s)


def _sync_errors(d: Path, fn):
    """Run ``fn``; if it fails on any rank with a damaged file, every rank raises one UserError
    naming the same file (the lowest failing index over all ranks)."""
    files = sorted((d / uni.SHARD_DIR).glob("rank*")) + [d / STATE_FILE, d / CONFIG_FILE, d / "megamoe_meta.json"]
    files += sorted(d.glob("megamoe_rank*.pt"))
    err, code = None, len(files) + 1
    try:
        fn()
    except (uni.CheckpointDamaged, UserError) as e:
        err = e
        code = next((i for i, f in enumerate(files) if str(f) in str(e)), len(files))
    worst = int(comm.all_reduce(torch.tensor([float(code)]), "min").item())
    if worst <= len(files):
        if err is not None and (worst == len(files) or str(files[worst]) in str(err)):
            msg = str(err)
        else:
            msg = str(uni._damaged(files[worst] if worst < len(files) else d, "reported by another rank"))
        # every rank prints, then waits for the others: the first rank to exit would otherwise
        # make torchrun kill the rest before they print (seen under load)
        sys.stderr.write(f"error: {msg}\n")  # one write: ranks sharing a pipe do not interleave lines
        sys.stderr.flush()
        comm.barrier()
        e = UserError(msg)
        e.reported = True
        raise e from None


def load(engine, load_dir: str | Path, current_config: dict | None = None, scheduler=None) -> dict:
    """Collective. Restores weights, fp32 masters, AdamW moments and steps, LR schedule, engine
    counters and (same world size) RNG; returns the client_state saved with it."""
    load_dir = Path(load_dir)
    tag = read_latest(load_dir)
    d = load_dir / tag
    if not (d / "COMPLETE").is_file():
        raise UserError(f"checkpoint {d} is incomplete (no COMPLETE marker); 'latest' must name a complete save")
    if not (d / uni.SHARD_DIR).is_dir():
        raise UserError(f"{d} has no {uni.SHARD_DIR}/: it was written by an older megamoe (DeepSpeed files); "
                        "resume it with that version, or start a new run from its weights with "
                        f"train.init_from={d / 'model.safetensors'}")
    out = {}

    def run():
        state = uni.read_json(d / STATE_FILE)
        try:
            saved_cfg = yaml.safe_load((d / CONFIG_FILE).read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
            raise uni._damaged(d / CONFIG_FILE, str(e).splitlines()[0][:200]) from None
        if current_config is not None:
            check_compatible(saved_cfg if isinstance(saved_cfg, dict) else {}, current_config, load_dir)
        reader = uni.CheckpointReader(d)
        _load_states(engine, reader, prepare_local(engine))
        out.update(state)
        meta = uni.read_json(d / "megamoe_meta.json")
        rng_file = d / f"megamoe_rank{dist.get_rank()}.pt"
        if meta.get("world") == dist.get_world_size() and rng_file.is_file():
            try:
                rng = torch.load(rng_file, map_location="cpu", weights_only=True)
            except Exception as e:
                raise uni._damaged(rng_file, str(e).splitlines()[0][:200]) from None
            set_rng_state(rng)

    _sync_errors(d, run)
    _restore_schedule(engine, scheduler, out)
    return out.get("client_state") or {}


def prepare_local(engine) -> _Plan:
    """The piece map without the writer election (loading needs no collective)."""
    plan = getattr(engine, "_megamoe_plan", None)
    if plan is not None:
        return plan
    from megamoe.model.state_dict import local_layout

    return _Plan([], local_layout(engine.module))


def _restore_schedule(engine, scheduler, state: dict) -> None:
    sched = state.get("scheduler")
    if scheduler is not None and sched:
        scheduler.last_epoch = sched["last_epoch"]
        scheduler._step_count = sched["_step_count"]
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for g, lr in zip(scheduler.optimizer.param_groups, lrs):
            g["lr"] = lr
        scheduler._last_lr = lrs
    for k, v in (state.get("engine") or {}).items():
        if hasattr(engine, k):
            setattr(engine, k, v)
