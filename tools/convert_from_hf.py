#!/usr/bin/env python
"""Import a local Llama, Mixtral or Qwen2-MoE Hugging Face checkpoint as a megamoe checkpoint.

    python tools/convert_from_hf.py --hf-dir path/to/llama --output runs/init/llama
    python tools/convert_from_hf.py --hf-dir path/to/llama --output runs/init/llama-moe \\
        --upcycle switch --num-experts 8 --every 2

The output (model.safetensors in canonical names + megamoe_config.yaml) continues pretraining
under any TP/EP layout: ``pretrain/pretrain_moe.py --config OUT/megamoe_config.yaml`` plus your
data/train/parallel overrides (train.init_from already points at the weights).
``--upcycle`` turns a dense model's FFN blocks into Switch, hash or MPO experts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megamoe.errors import UserError, cli_main  # noqa: E402


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="local Hugging Face model directory (Llama, Mixtral or Qwen2-MoE)")
    p.add_argument("--output", required=True, help="directory for the megamoe checkpoint")
    p.add_argument("--upcycle", choices=["switch", "hash", "mpo"], default=None,
                   help="turn a dense model's FFN blocks into experts of this kind")
    p.add_argument("--num-experts", type=int, default=8, help="experts per MoE block when upcycling")
    p.add_argument("--every", type=int, default=1, help="upcycle every k-th block (1 = all)")
    p.add_argument("--top-k", type=int, default=1, help="router top-k for switch / mpo upcycling")
    p.add_argument("--hash-variant", default="random", help="hash routing variant for --upcycle hash")
    p.add_argument("--counts-file", default=None, help="unigram counts for --hash-variant balanced")
    p.add_argument("--mpo-tensors", type=int, default=5, help="local tensors per MPO (--upcycle mpo)")
    p.add_argument("--mpo-max-bond", type=int, default=0, help="bond dimension cap (0 = exact)")
    p.add_argument("--noise", type=float, default=0.01, help="relative noise that breaks expert symmetry")
    p.add_argument("--seed", type=int, default=0, help="seed of routers, tables and noise")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = p.parse_args(argv)

    from megamoe.hf.import_ import import_hf, upcycle, upcycled_moe_config, write_checkpoint

    model_cfg, moe_cfg, sd = import_hf(args.hf_dir)
    if args.upcycle:
        if moe_cfg.num_experts:
            raise UserError(f"--upcycle needs a dense checkpoint; {args.hf_dir} already has "
                            f"{moe_cfg.num_experts} experts")
        moe_cfg = upcycled_moe_config(args.upcycle, model_cfg, num_experts=args.num_experts, every=args.every,
                                      top_k=args.top_k, hash_variant=args.hash_variant,
                                      counts_file=args.counts_file, mpo_num_tensors=args.mpo_tensors,
                                      mpo_max_bond=args.mpo_max_bond)
        sd = upcycle(model_cfg, moe_cfg, sd, noise=args.noise, seed=args.seed)
    tok = Path(args.hf_dir) / "tokenizer.model"
    write_checkpoint(args.output, model_cfg, moe_cfg, sd, source=str(args.hf_dir),
                     tokenizer=tok if tok.is_file() else None, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    main()
