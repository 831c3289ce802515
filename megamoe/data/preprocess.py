"""Raw text -> Megatron indexed dataset (``PREFIX_{key}_document.bin/.idx``), in parallel.

Pipeline: :mod:`megamoe.data.inputs` checks the files; ``datasets`` reads jsonl / txt /
parquet into Arrow (cache in a temporary directory beside the output, deleted afterwards);
a fork-started pool of ``workers`` processes encodes contiguous record ranges with
SentencePiece (one thread each) and returns flat int32 arrays; the parent appends each
record as one document to megatron-core's ``IndexedDatasetBuilder`` in input order.
Nothing appears under the output names until every file is complete: ``.bin``, metadata
``.json`` and finally ``.idx`` are renamed from temporary names in that order.

One input record = one document (with ``--append-eod`` its last token is EOD = eos id).
With ``--split-sentences`` each sentence is a separate sequence inside the document
(regex splitter, see :mod:`megamoe.data.text`).
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from megamoe.data import inputs as inp
from megamoe.data.text import split_sentences
from megamoe.data.tokenizer import load_sentencepiece, tokenizer_metadata, write_json
from megamoe.errors import UserError
from megamoe.utils import atomic_path, progress

_W: dict = {}  # per-worker state (dataset, tokenizer, options), set by _init


def _init(dataset, model_path, keys, append_eod, split):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path), num_threads=1)
    _W.update(ds=dataset, sp=sp, keys=keys, eod=sp.eos_id(), append_eod=append_eod, split=split)


def _encode_range(bounds):
    """Encode records [start, end): per key (tokens int32, seq lengths, seqs per doc) or error."""
    start, end = bounds
    ds, sp, eod = _W["ds"], _W["sp"], _W["eod"]
    batch = ds[start:end]
    out = {}
    for key in _W["keys"]:
        texts = batch[key]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                return ("missing", key, start + i)
        if _W["split"]:
            sents = [split_sentences(t) or [""] for t in texts]
            flat = sp.encode([s for doc in sents for s in doc], num_threads=1)
            per_doc = [len(doc) for doc in sents]
        else:
            flat = sp.encode(texts, num_threads=1)
            per_doc = [1] * len(texts)
        if _W["append_eod"]:  # EOD closes the document's last sequence
            pos = np.cumsum(per_doc) - 1
            for p in pos:
                flat[p].append(eod)
        lengths = np.fromiter(map(len, flat), np.int64, len(flat))
        tokens = np.fromiter(itertools.chain.from_iterable(flat), np.int32, int(lengths.sum()))
        out[key] = (tokens, lengths, np.asarray(per_doc, np.int64))
    return out


def _ranges(ds, key: str, workers: int, max_records: int) -> list[tuple[int, int]]:
    """Contiguous record ranges of about equal text size (documents vary from 100 bytes to
    50 KB; equal record counts would leave workers idle), at least 8 per worker, each at most
    ``max_records`` records."""
    import pyarrow.compute as pc

    sizes = pc.fill_null(pc.binary_length(ds.data.column(key)), 0).to_numpy().astype(np.int64)
    ends = np.cumsum(sizes)
    target = max(1, min(1 << 20, int(ends[-1]) // (8 * workers) + 1))
    bounds, start = [], 0
    while start < len(sizes):
        base = ends[start - 1] if start else 0
        stop = int(np.searchsorted(ends, base + target, side="left")) + 1
        stop = min(max(stop, start + 1), start + max_records, len(sizes))
        bounds.append((start, stop))
        start = stop
    return bounds


def _load(files: list[Path], builder: str, cache: Path):
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # we report read errors ourselves
    return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                 cache_dir=str(cache))


def run(input_specs, keys, model_path, output_prefix, workers=1, append_eod=False,
        split_sentences_=False, skip_invalid=False, chunk_records=1024, log=print) -> dict:
    """Build the datasets; return a summary dict (also written to each PREFIX.json)."""
    t0 = time.perf_counter()
    files, builder = inp.discover(input_specs)
    sp = load_sentencepiece(model_path)
    tok_meta = tokenizer_metadata(model_path, sp)
    if tok_meta["eos_id"] < 0 and append_eod:
        raise UserError(f"--append-eod: tokenizer {model_path} has no eos piece to use as EOD")
    level = "sentence" if split_sentences_ else "document"
    prefixes = {k: f"{output_prefix}_{k}_{level}" for k in keys}
    out_dir = Path(output_prefix).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    line_keys = keys if builder == "json" else None
    skipped = 0
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".tmp-preprocess-", dir=out_dir)))
        if builder in ("json", "text"):
            for i, f in enumerate(files):
                bad = inp.first_invalid_utf8(f)
                if bad and not skip_invalid:
                    raise UserError(f"{f}: invalid UTF-8 at byte offset {bad[0]} (line {bad[1]}); "
                                    "re-encode the file as UTF-8, or pass --skip-invalid to drop such lines")
                if skip_invalid:
                    clean = tmp / f"clean{i}{f.suffix}"
                    n = inp.clean_copy(f, line_keys, clean)
                    if n:
                        log(f"warning: {f}: skipped {n} invalid line(s)")
                        skipped += n
                        files[i] = clean
        try:
            ds = _load(files, builder, tmp / "hf_cache")
        except Exception as e:  # noqa: BLE001 - Arrow's errors are replaced by a file:line diagnosis
            for f in files:
                why = inp.diagnose(f, line_keys) if builder != "parquet" else None
                if why:
                    raise UserError(f"{why}; fix the line or pass --skip-invalid") from None
            raise UserError(f"could not read {', '.join(map(str, files))} as {builder}: "
                            f"{type(e).__name__}: {str(e)[:500]}") from None
        if len(ds) == 0:
            raise UserError(f"inputs {', '.join(map(str, files))} hold no records; nothing to preprocess")
        absent = [k for k in keys if k not in ds.column_names]
        if absent:
            raise UserError(f"{files[0]}: records have no field {absent[0]!r} (fields: "
                            f"{', '.join(ds.column_names)}); pass the right --json-keys")
        for k in keys:  # records lacking the key load as nulls; Arrow counts them for free
            if ds.data.column(k).null_count:
                where = next((w for f in files if (w := inp.diagnose(f, line_keys))), None)
                raise UserError(f"{where or f'{files[0]}: some records have no {k!r}'}; "
                                "fix the record or pass --skip-invalid")
        n = len(ds)
        ranges = _ranges(ds, keys[0], workers, chunk_records)
        import multiprocessing as mp

        # Fork the workers and queue their work *before* importing megatron-core (seconds
        # of imports), so that the import overlaps tokenization and workers stay small.
        pool = stack.enter_context(mp.get_context("fork").Pool(
            workers, _init, (ds, model_path, keys, append_eod, split_sentences_)))
        results = pool.imap(_encode_range, ranges)
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
        dtype = DType.optimal_dtype(tok_meta["vocab_size"])
        # renamed in reverse order of entering: json, .bin, then .idx last (the "done" marker)
        paths = {}
        for k, p in prefixes.items():
            paths[k] = (stack.enter_context(atomic_path(p + ".idx")),
                        stack.enter_context(atomic_path(p + ".bin")),
                        stack.enter_context(atomic_path(p + ".json")))
        builders = {k: IndexedDatasetBuilder(str(paths[k][1]), dtype=dtype) for k in keys}
        counts = {k: [0, 0, 0] for k in keys}  # documents, sequences, tokens
        bar = stack.enter_context(progress(total=n, unit="doc", desc="tokenize", mininterval=1.0))
        for (start, end), res in zip(ranges, results):
            if isinstance(res, tuple):
                _, key, row = res
                where = next((w for f in files if (w := inp.diagnose(f, line_keys))), f"record {row + 1}")
                raise UserError(f"{where}; fix the record or pass --skip-invalid")
            for k, (tokens, lengths, per_doc) in res.items():
                b, c = builders[k], counts[k]
                pos = seq = 0
                for m in per_doc:
                    ln = lengths[seq:seq + m]
                    total = int(ln.sum())
                    b.add_document(tokens[pos:pos + total], ln.tolist())
                    pos, seq = pos + total, seq + m
                c[0] += len(per_doc)
                c[1] += len(lengths)
                c[2] += len(tokens)
            bar.update(end - start)
        summary = {}
        for k in keys:
            builders[k].finalize(str(paths[k][0]))
            rel = os.path.relpath(Path(model_path).resolve(), Path(prefixes[k]).resolve().parent)
            meta = {
                "tokenizer": {**tok_meta, "path": rel}, "json_key": k, "level": level,
                "append_eod": append_eod, "eod_id": tok_meta["eos_id"], "dtype": np.dtype(dtype).name,
                "documents": counts[k][0], "sequences": counts[k][1], "tokens": counts[k][2],
                "skipped_invalid_lines": skipped, "inputs": [str(f) for f in input_specs],
            }
            write_json(paths[k][2], meta)
            summary[prefixes[k]] = meta
    secs = time.perf_counter() - t0
    for p, m in summary.items():
        log(f"wrote {p}.bin/.idx: {m['documents']:,} documents, {m['tokens']:,} tokens "
            f"in {secs:.1f}s ({m['tokens'] / secs:,.0f} tokens/s, {workers} workers)")
    return summary

