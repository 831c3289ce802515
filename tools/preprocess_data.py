#!/usr/bin/env python
"""Tokenize jsonl / txt / parquet (files or a directory) into Megatron indexed datasets.

Flags follow Megatron-LM's tools/preprocess_data.py. Output: ``PREFIX_{key}_document.bin``
/ ``.idx`` (readable by megatron-core's IndexedDataset and Megatron-LM) plus ``.json``
metadata (tokenizer path, sha256, vocab size, special ids, counts). See
:mod:`megamoe.data.preprocess` for how it works.

Example:
  python tools/preprocess_data.py --input data/raw/corpus.jsonl --json-keys text \\
      --tokenizer-model data/tokenizer/spm.model --output-prefix data/corpus --workers 2 --append-eod
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megamoe.data.preprocess import run  # noqa: E402
from megamoe.errors import UserError, cli_main  # noqa: E402


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--input", nargs="+", required=True, help="jsonl/json/txt/parquet files or directories")
    ap.add_argument("--json-keys", nargs="+", default=["text"], help="fields to tokenize (one dataset each)")
    ap.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file")
    ap.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                    choices=["SentencePieceTokenizer", "GPTSentencePieceTokenizer"],
                    help="accepted for Megatron compatibility; both mean SentencePiece")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx/.json")
    ap.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    ap.add_argument("--append-eod", action="store_true", help="end every document with EOD (eos id)")
    ap.add_argument("--split-sentences", action="store_true",
                    help="store each sentence as its own sequence (outputs *_sentence)")
    ap.add_argument("--skip-invalid", action="store_true",
                    help="drop lines that are not UTF-8 / not JSON / lack the key, and report the count")
    ap.add_argument("--chunk-records", type=int, default=1024,
                    help="at most this many records per worker task (tasks are balanced by text size)")
    args = ap.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be >= 1")
    run(args.input, args.json_keys, args.tokenizer_model, args.output_prefix, args.workers,
        args.append_eod, args.split_sentences, args.skip_invalid, args.chunk_records)
    return 0


if __name__ == "__main__":
    main()
