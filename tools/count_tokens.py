#!/usr/bin/env python
"""Unigram token counts of an indexed dataset's TRAINING split: ``PREFIX.counts.npy``.

Format (the contract with the balanced hash router, megamoe/moe/hashing.py): a 1-D int64
array of length = tokenizer vocab size (from ``PREFIX.json``, or ``--vocab-size`` for
datasets without megamoe metadata); entry i = how many times token id i occurs in the
training sequences of ``PREFIX.bin`` (EOD included). Written atomically.

Only the training split is counted (the Hash Layers authors built balanced tables from
training-data frequencies; counting valid/test too would leak their statistics into the
model). The split is megatron-core's rule, which the data pipeline uses: with ``--split``
shares normalised to sum 1, train = sequences ``[0, round(share_train * num_sequences))`` in
file order. Pass the run's ``data.split``; the default is DataConfig's default (969,30,1).
A split whose train share is smaller than the run's counts a prefix of the run's training
data (no leak); a larger one would count validation data, so use the run's value.

Example: python tools/count_tokens.py --data-prefix data/corpus_text_document --split 98,2,0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megamoe.data.config import DataConfig  # noqa: E402
from megamoe.data.indexed import read_meta, verify_files  # noqa: E402
from megamoe.errors import UserError, cli_main  # noqa: E402
from megamoe.utils import atomic_path  # noqa: E402


def train_sequences(split: str, num_sequences: int) -> int:
    """Number of leading sequences in the train split (megatron-core's rounding)."""
    parts = [float(x) for x in split.replace("/", ",").split(",")]
    if not 1 <= len(parts) <= 3 or any(x < 0 for x in parts) or sum(parts) <= 0:
        raise UserError(f"--split={split!r}: give up to 3 non-negative shares train,valid,test, e.g. 98,2,0")
    return int(round(parts[0] / sum(parts) * num_sequences))


def count_tokens(prefix: str, vocab_size: int | None = None, split: str = DataConfig.split,
                 block: int = 1 << 24) -> tuple[np.ndarray, int, int]:
    """-> (counts [V], sequences counted, sequences in the file)."""
    n_seq, _, dtype = verify_files(prefix)
    meta = read_meta(prefix)
    if vocab_size is None:
        if meta is None:
            raise UserError(f"{prefix}.json (metadata) not found: pass --vocab-size")
        vocab_size = int(meta["tokenizer"]["vocab_size"])
    n_train = train_sequences(split, n_seq)
    lengths = np.frombuffer(Path(f"{prefix}.idx").read_bytes(), np.int32, n_seq, 34).astype(np.int64)
    end = int(lengths[:n_train].sum())  # sequences lie in file order, back to back
    tokens = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r")[:end] if end else np.zeros(0, dtype)
    counts = np.zeros(vocab_size, np.int64)
    for s in range(0, len(tokens), block):
        part = np.bincount(tokens[s:s + block], minlength=vocab_size)
        if len(part) > vocab_size:
            raise UserError(f"{prefix}.bin holds token id {len(part) - 1} >= vocab size {vocab_size}; "
                            "wrong --vocab-size, or the data was built with another tokenizer")
        counts += part
    return counts, n_train, n_seq


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-prefix", required=True, help="dataset prefix (PREFIX.bin/.idx)")
    ap.add_argument("--vocab-size", type=int, help="override the vocab size from PREFIX.json")
    ap.add_argument("--split", default=DataConfig.split,
                    help="the run's data.split (train,valid,test shares); only the train split is counted")
    ap.add_argument("--output", help="default: PREFIX.counts.npy")
    args = ap.parse_args(argv)
    write_counts(args.data_prefix, args.split, args.output, args.vocab_size)
    return 0


def write_counts(prefix: str, split: str, output: str | Path | None = None, vocab_size: int | None = None) -> Path:
    """Count the train split of ``split`` and write ``output`` (default PREFIX.counts.npy) atomically."""
    counts, n_train, n_seq = count_tokens(prefix, vocab_size, split)
    out = Path(output or f"{prefix}.counts.npy")
    with atomic_path(out) as tmp, open(tmp, "wb") as f:  # np.save(path) would append .npy
        np.save(f, counts)
    print(f"wrote {out}: {int(counts.sum()):,} tokens of the train split (sequences 0..{n_train} of {n_seq}, "
          f"split {split}), {int((counts > 0).sum()):,} of {len(counts):,} ids used")
    return out


if __name__ == "__main__":
    main()
