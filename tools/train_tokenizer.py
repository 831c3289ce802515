#!/usr/bin/env python
"""Train a SentencePiece tokenizer (BPE or unigram) on text/jsonl, or adopt an existing .model.

Writes ``PREFIX.model``, ``PREFIX.vocab`` and ``PREFIX.json`` (vocab size, unk/bos/eos/pad
ids, model type, byte fallback, sha256, inputs); preprocessing copies that metadata into
every dataset it builds.

Trap handled here: SentencePiece silently skips training lines longer than
``max_sentence_length`` bytes. Documents are split into paragraphs, then sentences, then
whitespace-bounded chunks (:func:`megamoe.data.text.split_for_training`), so every byte
reaches the trainer's input. ``--input-sentence-size`` caps (by uniform sampling) how many of
those lines the trainer *uses*, to keep training to seconds.

Examples:
  python tools/train_tokenizer.py --input data/raw/corpus.jsonl --vocab-size 8000 \\
      --model-type bpe --output-prefix data/tokenizer/spm
  python tools/train_tokenizer.py --existing-model tokenizer.model.v1 --output-prefix data/tokenizer/mistral
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megamoe.data.text import split_for_training  # noqa: E402
from megamoe.data.tokenizer import load_sentencepiece, tokenizer_metadata, write_json  # noqa: E402
from megamoe.errors import UserError, cli_main  # noqa: E402
from megamoe.utils import atomic_path  # noqa: E402

MAX_LINE_BYTES = 4000  # < SentencePiece's default max_sentence_length of 4192


def iter_documents(path: Path, json_key: str):
    """Yield (line_number, text) from a .jsonl/.json-lines or plain text file (one doc per line)."""
    is_json = path.suffix in (".jsonl", ".json")
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid UTF-8 at byte offset {offset + e.start}; "
                                "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            offset += len(raw)
            if not line.strip():
                continue
            if not is_json:
                yield lineno, line
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line of a .jsonl "
                                "file must be one JSON object") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(json_key), str):
                raise UserError(f"{path}:{lineno}: record has no string field {json_key!r}; "
                                "pass the right --json-key")
            yield lineno, rec[json_key]


def write_training_lines(inputs: list[Path], json_key: str, out) -> tuple[int, int]:
    """Split every document into <= MAX_LINE_BYTES lines; return (documents, lines)."""
    docs = lines = 0
    for path in inputs:
        for _, text in iter_documents(path, json_key):
            docs += 1
            for piece in split_for_training(text, MAX_LINE_BYTES):
                out.write(piece + "\n")
                lines += 1
    return docs, lines


def _inputs(spec: list[str]) -> list[Path]:
    files = []
    for s in spec:
        p = Path(s)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix in (".jsonl", ".json", ".txt"))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"input {p} does not exist; pass a .jsonl/.txt file or a directory")
    if not files:
        raise UserError(f"no .jsonl/.json/.txt files found in {spec}")
    return files


def train(args, prefix: Path) -> dict:
    import sentencepiece as spm

    inputs = _inputs(args.input)
    with tempfile.TemporaryDirectory(prefix="spm-train-") as tmp:
        text_file = Path(tmp) / "lines.txt"
        with open(text_file, "w", encoding="utf-8") as f:
            docs, lines = write_training_lines(inputs, args.json_key, f)
        if lines == 0:
            raise UserError(f"inputs {[str(p) for p in inputs]} hold no text; nothing to train on")
        print(f"training {args.model_type} tokenizer, vocab {args.vocab_size}, on {docs:,} documents "
              f"({lines:,} lines, using at most {args.input_sentence_size:,})", flush=True)
        with atomic_path(prefix.with_suffix(".model")) as model_tmp, \
                atomic_path(prefix.with_suffix(".vocab")) as vocab_tmp:
            spm.set_random_generator_seed(args.seed)  # reproducible input sampling
            try:
                spm.SentencePieceTrainer.Train(
                    input=str(text_file), model_prefix=str(Path(tmp) / "m"), model_type=args.model_type,
                    vocab_size=args.vocab_size, byte_fallback=args.byte_fallback,
                    character_coverage=args.character_coverage,
                    input_sentence_size=args.input_sentence_size, shuffle_input_sentence=True,
                    max_sentence_length=MAX_LINE_BYTES + 192, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                    num_threads=args.threads, split_digits=True, allow_whitespace_only_pieces=True,
                    remove_extra_whitespaces=False, minloglevel=2,
                )
            except RuntimeError as e:
                raise UserError(f"SentencePiece training failed: {e}; for a small corpus lower "
                                "--vocab-size") from None
            shutil.move(Path(tmp) / "m.model", model_tmp)
            shutil.move(Path(tmp) / "m.vocab", vocab_tmp)
    return {"trained_on": [str(p) for p in inputs], "documents": docs, "training_lines": lines,
            "input_sentence_size": args.input_sentence_size}


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--input", nargs="+", help=".jsonl / .txt files or directories to train on")
    ap.add_argument("--json-key", default="text", help="field holding the text in jsonl records")
    ap.add_argument("--existing-model", help="adopt this SentencePiece .model instead of training")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.model, PREFIX.vocab, PREFIX.json")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    ap.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                    help="unknown characters become UTF-8 byte pieces instead of <unk>")
    ap.add_argument("--character-coverage", type=float, default=0.9995)
    ap.add_argument("--input-sentence-size", type=int, default=1_000_000,
                    help="train on at most this many (sampled) lines")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    if bool(args.input) == bool(args.existing_model):
        raise UserError("pass exactly one of --input (train) or --existing-model (adopt a .model)")
    if args.vocab_size < 16:
        raise UserError(f"--vocab-size {args.vocab_size} is too small (need room for 4 special pieces)")
    prefix = Path(args.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if args.existing_model:
        load_sentencepiece(args.existing_model)  # validates
        with atomic_path(prefix.with_suffix(".model")) as tmp:
            shutil.copyfile(args.existing_model, tmp)
        extra = {"adopted_from": str(args.existing_model)}
    else:
        extra = train(args, prefix)
    meta = {**tokenizer_metadata(prefix.with_suffix(".model")), **extra}
    write_json(prefix.with_suffix(".json"), meta)
    print(f"wrote {prefix}.model ({meta['vocab_size']} pieces; unk={meta['unk_id']} bos={meta['bos_id']} "
          f"eos={meta['eos_id']} pad={meta['pad_id']}) and {prefix}.json")
    return 0


if __name__ == "__main__":
    main()
