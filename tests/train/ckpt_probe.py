"""Run under torchrun by tests/train/test_checkpoint_files.py: train a config, then

- ``masters OUT``: save, and write the reference fp32 masters to OUT, taken with DeepSpeed's
  own API (``deepspeed.utils.safe_get_full_fp32_param``, reduced over each parameter's DP or
  expert-DP group) and merged over TP/EP by ``gather_full_state_dict``: what a consolidated
  checkpoint must equal, computed without megamoe's checkpoint code;
- ``memory OUT``: measure each rank's peak extra resident memory during one save (Linux
  ``/proc/self/clear_refs`` resets the peak, ``VmHWM`` reads it) next to its shard file size and
  the largest tensor, and write them as JSON lines to OUT.rank{r}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main() -> None:
    mode, out, config, *overrides = sys.argv[1:]
    import torch
    import torch.distributed as dist

    from megamoe.run_config import load_run_config
    from megamoe.train.trainer import Trainer

    run = load_run_config(config, overrides)
    t = Trainer(run)
    t.fit()
    rank = dist.get_rank()
    if mode == "masters":
        from deepspeed.utils import safe_get_full_fp32_param

        from megamoe.model.state_dict import gather_full_state_dict

        params = list(t.engine.module.parameters())
        full = [safe_get_full_fp32_param(p) for p in params]
        saved = [p.data for p in params]
        for p, f in zip(params, full):
            p.data = f
        sd = gather_full_state_dict(t.engine.module)
        for p, d in zip(params, saved):
            p.data = d
        module = gather_full_state_dict(t.engine.module)
        if rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in sd.items()}, out)
            save_file({k: v.contiguous() for k, v in module.items()}, out + ".module")
    elif mode == "memory":
        from megamoe.train import checkpoint as ckpt

        largest = max(p.numel() * 4 for p in t.engine.module.parameters())  # fp32 bytes
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
        t.step += 1  # a new tag
        tag = t.save()
        peak = _status("VmHWM")
        shard = Path(run.train.save_dir) / tag / "shards" / f"rank{rank:05d}.safetensors"
        from megamoe.model.state_dict import gather_full_state_dict

        Path("/proc/self/clear_refs").write_text("5")
        before_g = _status("VmRSS")
        full = gather_full_state_dict(t.engine.module)  # what the old save did on every rank
        peak_g = _status("VmHWM")
        own = {p.untyped_storage().data_ptr() for p in t.engine.module.parameters()}
        held = sum(v.nbytes for v in full.values() if v.untyped_storage().data_ptr() not in own)
        del full
        rec = {"rank": rank, "extra": peak - before, "shard": shard.stat().st_size, "largest": largest,
               "gather_extra": peak_g - before_g, "gather_held": held,
               "params": sum(p.numel() for p in t.engine.module.parameters()),
               "consolidates": rank == 0 and run.train.save_full_model}
        Path(f"{out}.rank{rank}").write_text(json.dumps(rec))
    dist.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
