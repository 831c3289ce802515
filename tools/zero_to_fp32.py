#!/usr/bin/env python
"""Consolidate a megamoe checkpoint into one full fp32 model file (experts included).

    python zero_to_fp32.py <save_dir> <out.safetensors>       # inside a save dir's global_stepN/
    python tools/zero_to_fp32.py runs/demo/checkpoints out/model.safetensors [--tag global_step200]

Works for any TP / EP / DP layout and ZeRO stage: the checkpoint holds canonical pieces of the
fp32 master weights (megamoe/train/universal.py), which are assembled one tensor at a time and
streamed to ``out`` (a rank never held the full model, and neither does this tool).
``<save_dir>`` may be the training save_dir (uses ``latest``), one ``global_stepN`` directory, or
``.`` from inside one, as DeepSpeed users run the script DeepSpeed drops in each save. If ``out``
is a directory (or has no .safetensors suffix), ``model.safetensors`` and
``megamoe_config.yaml`` are written into it: a canonical directory that ``tools/evaluate.py``,
``tools/convert_to_hf.py`` and ``train.init_from`` accept. ``--state exp_avg`` / ``exp_avg_sq``
write AdamW's moments instead.

This file replaces DeepSpeed's ``zero_to_fp32.py`` (which cannot read MoE checkpoints): the
trainer copies it into every ``global_stepN`` with ``MEGAMOE_ROOT`` set, so it finds megamoe
from anywhere.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

MEGAMOE_ROOT = None  # set in the copy written into each checkpoint
sys.path.insert(0, MEGAMOE_ROOT or str(Path(__file__).resolve().parents[1]))

from megamoe.errors import UserError, cli_main  # noqa: E402


def _tag_dir(path: Path, tag: str | None) -> Path:
    if not path.is_dir():
        raise UserError(f"{path} is not a directory: pass a training save_dir or one global_stepN directory")
    if (path / "latest").is_file() and not (path / "shards").is_dir():
        tag = tag or (path / "latest").read_text().strip()
        path = path / tag
    elif tag:
        path = path / tag
    if not (path / "shards").is_dir():
        raise UserError(f"{path} has no shards/ directory: not a megamoe checkpoint (pass the save_dir or a "
                        "global_stepN inside it)")
    if not (path / "COMPLETE").is_file():
        raise UserError(f"{path} is incomplete (no COMPLETE marker: its save was interrupted); use an earlier tag")
    return path


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="save_dir (follows 'latest'), or one global_stepN directory")
    p.add_argument("output", help="output .safetensors file, or a directory to write a canonical checkpoint into")
    p.add_argument("--tag", default=None, help="global_stepN inside a save_dir (default: the one 'latest' names)")
    p.add_argument("--state", default="weight", choices=["weight", "exp_avg", "exp_avg_sq"],
                   help="which tensors: fp32 master weights (default) or an AdamW moment")
    args = p.parse_args(argv)

    from megamoe.train import universal as uni

    d = _tag_dir(Path(args.checkpoint), args.tag)
    out = Path(args.output)
    as_dir = out.suffix != ".safetensors"
    target = out / "model.safetensors" if as_dir else out
    try:
        uni.consolidate(d, target, args.state)
    except uni.CheckpointDamaged as e:
        raise UserError(str(e)) from None
    if as_dir and (d / "megamoe_config.yaml").is_file():
        shutil.copyfile(d / "megamoe_config.yaml", out / "megamoe_config.yaml")
    print(f"wrote {target} ({args.state} of {d})")
    return 0


if __name__ == "__main__":
    main()
