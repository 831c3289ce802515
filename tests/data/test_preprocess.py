"""preprocess_data.py / count_tokens.py: Megatron-readable output equal to the tokenizer's own
encoding (+EOD), one document per record, metadata, counts; the real corpus when fetched."""

import json
import random

import numpy as np
import pytest
import sentencepiece as spm

from tests.data.conftest import CORPUS, ROOT, tool, write_jsonl


def _check_dataset(prefix, texts, model, eod=True):
    """Every document equals sp.encode(text) (+ EOD), read back with megatron-core."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sp = spm.SentencePieceProcessor(model_file=str(model))
    ds = IndexedDataset(str(prefix))
    assert len(ds.document_indices) - 1 == len(texts)  # one document per input record
    for i, text in enumerate(texts):
        want = sp.EncodeAsIds(text) + ([sp.eos_id()] if eod else [])
        np.testing.assert_array_equal(ds[i], np.asarray(want, dtype=ds[i].dtype), err_msg=f"document {i}")


def test_preprocess_cli_small(tmp_path, small_jsonl, tokenizer):
    out = tmp_path / "small"
    r = tool("preprocess_data", "--input", small_jsonl, "--json-keys", "text", "--tokenizer-model",
             tokenizer, "--output-prefix", out, "--workers", 2, "--append-eod", "--chunk-records", 7)
    assert r.returncode == 0, r.stderr
    texts = [json.loads(line)["text"] for line in small_jsonl.read_text().splitlines()]
    prefix = tmp_path / "small_text_document"
    _check_dataset(prefix, texts, tokenizer)
    meta = json.loads((tmp_path / "small_text_document.json").read_text())
    tok_meta = json.loads(tokenizer.with_suffix(".json").read_text())
    assert meta["documents"] == len(texts) and meta["eod_id"] == 2
    assert meta["tokenizer"]["sha256"] == tok_meta["sha256"] and meta["tokenizer"]["vocab_size"] == 400
    assert (tmp_path / meta["tokenizer"]["path"]).resolve() == tokenizer.resolve()
    assert not list(tmp_path.glob(".tmp-*"))  # temporary files and the datasets cache are gone

    r = tool("count_tokens", "--data-prefix", prefix, "--split", "1,0,0")  # all sequences are train
    assert r.returncode == 0, r.stderr
    counts = np.load(f"{prefix}.counts.npy")
    tokens = np.memmap(f"{prefix}.bin", dtype=np.uint16, mode="r")
    assert counts.dtype == np.int64 and counts.shape == (400,)
    np.testing.assert_array_equal(counts, np.bincount(tokens, minlength=400))
    assert counts[2] == len(texts)  # one EOD per document


def test_preprocess_txt_dir_and_sentences(tmp_path, tokenizer):
    """A directory of .txt files (one document per line), split into sentence sequences."""
    from megamoe.data.preprocess import run
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = tmp_path / "txt"
    src.mkdir()
    (src / "a.txt").write_text("One sentence. Two sentences!\nThird line here.\n")
    (src / "b.txt").write_text("Last doc? Yes.\n")
    run([str(src)], ["text"], str(tokenizer), str(tmp_path / "t"), workers=1, append_eod=True,
        split_sentences_=True, log=lambda *a: None)
    ds = IndexedDataset(str(tmp_path / "t_text_sentence"))
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    assert list(np.diff(ds.document_indices)) == [2, 1, 2]  # sentences per document
    assert list(ds[1]) == sp.EncodeAsIds("Two sentences!") + [2]  # EOD ends the document
    assert list(ds[0]) == sp.EncodeAsIds("One sentence.")


@pytest.mark.skipif(not CORPUS.is_file(), reason="run make data (needs data/raw/corpus.jsonl)")
def test_preprocess_real_corpus_subset(tmp_path, tokenizer):
    """A subset of the fetched corpus (every source, incl. 40 KB single-line speeches)."""
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    rng = random.Random(0)
    subset = [json.loads(line) for line in rng.sample(lines, 60)]
    subset += [json.loads(line) for line in lines[:3]]  # SotU speeches: single 40 KB lines
    texts = [r["text"] for r in subset]
    src = write_jsonl(tmp_path / "subset.jsonl", texts)
    from megamoe.data.preprocess import run  # in-process: the CLI is exercised by the other tests

    run([str(src)], ["text"], str(tokenizer), str(tmp_path / "sub"), workers=2, append_eod=True,
        log=lambda *a: None)
    _check_dataset(tmp_path / "sub_text_document", texts, tokenizer)


BUILT = ROOT / "data" / "corpus_text_document"


@pytest.mark.skipif(not (CORPUS.is_file() and BUILT.with_suffix(".idx").is_file()),
                    reason="run make data (needs data/corpus_text_document from the fetched corpus)")
def test_make_data_output_matches_corpus():
    """The dataset `make data` built from the whole corpus: one document per record, and
    200 sampled documents equal the tokenizer's own encoding + EOD."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    meta = json.loads(BUILT.with_suffix(".json").read_text())
    model = (BUILT.parent / meta["tokenizer"]["path"]).resolve()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    ds = IndexedDataset(str(BUILT))
    assert len(ds.document_indices) - 1 == len(lines) == meta["documents"]
    for i in random.Random(1).sample(range(len(lines)), 200):
        want = sp.EncodeAsIds(json.loads(lines[i])["text"]) + [sp.eos_id()]
        np.testing.assert_array_equal(ds[i], np.asarray(want, dtype=ds[i].dtype), err_msg=f"doc {i}")
    counts = np.load(f"{BUILT}.counts.npy")  # the train split of `make data`'s 98,2,0 only
    tokens = np.memmap(f"{BUILT}.bin", dtype=ds.index.dtype, mode="r")
    n_train = int(round(0.98 * len(ds.sequence_lengths)))
    train = tokens[:int(ds.sequence_lengths[:n_train].astype(np.int64).sum())]
    assert counts.shape == (meta["tokenizer"]["vocab_size"],)
    np.testing.assert_array_equal(counts, np.bincount(train, minlength=len(counts)))
    assert 0.9 * meta["tokens"] < counts.sum() < meta["tokens"]
