"""Tokenizer training: special ids recorded, long documents split not dropped, adopting a .model."""

import json

import sentencepiece as spm

from megamoe.data.text import split_for_training, split_sentences
from megamoe.data.tokenizer import sha256_file
from tests.data.conftest import tool


def test_split_for_training_covers_everything_and_bounds_lines():
    text = ("First paragraph. It has two sentences!\n\n" + "word " * 3000 + "end.\n\n"
            + "Sentence one. " * 500 + "\n\n" + "x" * 9000)
    lines = list(split_for_training(text, max_bytes=1000))
    assert all(len(s.encode()) <= 1000 and "\n" not in s for s in lines)
    # nothing dropped: the lines hold exactly the non-whitespace characters of the text
    assert "".join("".join(lines).split()) == "".join(text.split())
    assert split_sentences('He said "stop." Then left. ok') == ['He said "stop."', "Then left.", "ok"]


def test_trained_tokenizer_metadata(tokenizer):
    meta = json.loads(tokenizer.with_suffix(".json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    assert meta["vocab_size"] == sp.GetPieceSize() == 400
    assert (meta["unk_id"], meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (0, 1, 2, 3)
    assert sp.IdToPiece(2) == "</s>" and sp.IdToPiece(3) == "<pad>"
    assert meta["byte_fallback"] and meta["model_type"] == "bpe"
    assert meta["sha256"] == sha256_file(tokenizer)
    # the 400-sentence document (one ~20 KB line) was split, so there are more lines than docs
    assert meta["training_lines"] > meta["documents"] == 122
    # byte fallback: an unseen character round-trips instead of becoming <unk>
    assert sp.DecodeIds(sp.EncodeAsIds("Ωmega")) == "Ωmega"


def test_existing_model_is_adopted(tmp_path, tokenizer):
    r = tool("train_tokenizer", "--existing-model", tokenizer, "--output-prefix", tmp_path / "adopted")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "adopted.json").read_text())
    assert meta["sha256"] == sha256_file(tokenizer) and meta["adopted_from"] == str(tokenizer)


def test_tokenizer_bad_inputs(tmp_path):
    r = tool("train_tokenizer", "--input", tmp_path / "nope.jsonl", "--output-prefix", tmp_path / "t")
    assert r.returncode == 2 and "does not exist" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    r = tool("train_tokenizer", "--input", bad, "--output-prefix", tmp_path / "t")
    assert r.returncode == 2 and f"{bad}:2: not valid JSON" in r.stderr
    r = tool("train_tokenizer", "--existing-model", bad, "--output-prefix", tmp_path / "t")
    assert r.returncode == 2 and "not a SentencePiece model" in r.stderr
    assert not list(tmp_path.glob("t.*")) and not list(tmp_path.glob(".tmp-*"))
