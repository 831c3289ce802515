#!/usr/bin/env python
"""Build a hash-routing table offline and save it as .npy ([num_hashes, K] int64).

Mainly for the k-means variants, which cluster the token embeddings of a trained checkpoint:

    python tools/build_hash_table.py --variant clustered --checkpoint ckpt/model.safetensors \\
        --num-experts 64 --output tables/clustered64.npy

then train with ``moe.hash.variant=clustered moe.hash.table_file=tables/clustered64.npy``.
``--checkpoint`` is a safetensors file holding the canonical ``embed.weight`` [V, D] (for now;
reading DeepSpeed checkpoints is the checkpoint tool's job). ``balanced`` needs ``--counts``
(``<data-prefix>.counts.npy`` from tools/count_tokens.py). The table is written atomically;
a model saves it in its state_dict from then on and never rebuilds it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from megamoe.errors import UserError, cli_main
from megamoe.model.config import HashConfig
from megamoe.moe.hashing import build_table, load_counts, load_embedding, read_npy
from megamoe.utils import atomic_path


@cli_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", required=True, choices=["clustered", "dispersed", "balanced", "random"],
                    help="which table to build")
    ap.add_argument("--num-experts", type=int, required=True, help="E")
    ap.add_argument("--checkpoint", help="safetensors file with 'embed.weight' (clustered / dispersed)")
    ap.add_argument("--counts", help="unigram counts .npy from tools/count_tokens.py (balanced)")
    ap.add_argument("--vocab-size", type=int, help="V (default: rows of embed.weight or length of counts)")
    ap.add_argument("--num-hashes", type=int, default=1, help="MultiHash: number of hashes")
    ap.add_argument("--seed", type=int, default=1234, help="seed (random tables, k-means init; MultiHash hash m >= 1 uses seed + m)")
    ap.add_argument("--output", required=True, help="output .npy path")
    args = ap.parse_args(argv)
    if args.num_experts < 1:
        raise UserError(f"--num-experts={args.num_experts}: must be >= 1")
    embed = counts = None
    if args.variant in ("clustered", "dispersed"):
        if not args.checkpoint:
            raise UserError(f"--variant {args.variant} needs --checkpoint (safetensors with embed.weight)")
        embed = load_embedding(args.checkpoint)
        vocab = args.vocab_size or embed.shape[0]
    elif args.variant == "balanced":
        if not args.counts:
            raise UserError("--variant balanced needs --counts (<data-prefix>.counts.npy from tools/count_tokens.py)")
        vocab = args.vocab_size or len(read_npy(Path(args.counts), "--counts"))
        counts = load_counts(args.counts, vocab)
    else:
        if not args.vocab_size:
            raise UserError("--variant random needs --vocab-size")
        vocab = args.vocab_size
    cfg = HashConfig(variant=args.variant, num_hashes=args.num_hashes, seed=args.seed,
                     counts_file=args.counts, embedding_checkpoint=args.checkpoint)
    table = build_table(cfg, args.num_experts, vocab, 0, embed_VD=embed, counts_V=counts).numpy()
    with atomic_path(args.output) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, table)
    load = np.bincount(table[0], minlength=args.num_experts)
    print(f"wrote {args.output}: table {table.shape}, ids per expert min {load.min()} max {load.max()}")
    return 0


if __name__ == "__main__":
    main()
