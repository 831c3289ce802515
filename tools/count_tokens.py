#!/usr/bin/env python
"""Unigram token counts of an indexed dataset: ``PREFIX.counts.npy``.

Format (the contract with the balanced hash router, megamoe/moe/hashing.py): a 1-D int64
array of length = tokenizer vocab size (from ``PREFIX.json``, or ``--vocab-size`` for
datasets without megamoe metadata); entry i = how many times token id i occurs in
``PREFIX.bin`` (EOD included). Written atomically.

Example: python tools/count_tokens.py --data-prefix data/corpus_text_document
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megamoe.data.indexed import read_meta, verify_files  # noqa: E402
from megamoe.errors import UserError, cli_main  # noqa: E402
from megamoe.utils import atomic_path  # noqa: E402


def count_tokens(prefix: str, vocab_size: int | None = None, block: int = 1 << 24) -> np.ndarray:
    _, _, dtype = verify_files(prefix)
    meta = read_meta(prefix)
    if vocab_size is None:
        if meta is None:
            raise UserError(f"{prefix}.json (metadata) not found: pass --vocab-size")
        vocab_size = int(meta["tokenizer"]["vocab_size"])
    tokens = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r")
    counts = np.zeros(vocab_size, np.int64)
    for s in range(0, len(tokens), block):
        part = np.bincount(tokens[s:s + block], minlength=vocab_size)
        if len(part) > vocab_size:
            raise UserError(f"{prefix}.bin holds token id {len(part) - 1} >= vocab size {vocab_size}; "
                            "wrong --vocab-size, or the data was built with another tokenizer")
        counts += part
    return counts


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-prefix", required=True, help="dataset prefix (PREFIX.bin/.idx)")
    ap.add_argument("--vocab-size", type=int, help="override the vocab size from PREFIX.json")
    ap.add_argument("--output", help="default: PREFIX.counts.npy")
    args = ap.parse_args(argv)
    counts = count_tokens(args.data_prefix, args.vocab_size)
    out = Path(args.output or f"{args.data_prefix}.counts.npy")
    with atomic_path(out) as tmp, open(tmp, "wb") as f:  # np.save(path) would append .npy
        np.save(f, counts)
    print(f"wrote {out}: {int(counts.sum()):,} tokens, {int((counts > 0).sum()):,} of {len(counts):,} ids used")
    return 0


if __name__ == "__main__":
    main()
