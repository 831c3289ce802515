"""Bad input: each case fails with a message naming the file and the cause, exit code 2 for the
command-line tools, and no output that looks valid (no PREFIX.bin/.idx/.json, no temp files)."""

import shutil

import pytest

from megamoe.data import DataConfig, build_datasets
from megamoe.errors import UserError
from tests.data.conftest import tool


def _no_outputs(d):
    left = [p.name for p in d.iterdir() if "out" in p.name or p.name.startswith(".tmp-")]
    assert not left, left


def _preprocess(tmp_path, src, tokenizer, *extra):
    return tool("preprocess_data", "--input", src, "--tokenizer-model", tokenizer,
                "--output-prefix", tmp_path / "out", *extra)


CASES = {
    "missing": (None, "does not exist"),
    "empty": (b"", "is empty"),
    "blank_lines": (b"\n  \n", "is empty"),
    "not_json": (b'{"text": "a"}\n{"text": "b"}\n{"text": broken\n', "bad.jsonl:3: not valid JSON"),
    "missing_key": (b'{"text": "a"}\n{"body": "b"}\n', "bad.jsonl:2: record has no string field 'text'"),
    "invalid_utf8": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "invalid UTF-8 at byte offset 28 (line 2)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_preprocess_rejects(tmp_path, tokenizer, case):
    content, message = CASES[case]
    src = tmp_path / "bad.jsonl"
    if content is not None:
        src.write_bytes(content)
    r = _preprocess(tmp_path, src, tokenizer)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and str(src) in r.stderr and "Traceback" not in r.stderr
    _no_outputs(tmp_path)


def test_skip_invalid_counts_and_keeps_the_rest(tmp_path, tokenizer):
    """--skip-invalid drops the bad lines, reports how many, and builds from the rest."""
    from megamoe.data.preprocess import run

    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b'{"text": "good one"}\n{"text": "caf\xe9"}\nnot json\n{"x": 1}\n{"text": "good two"}\n')
    logs = []
    summary = run([str(src)], ["text"], str(tokenizer), str(tmp_path / "ok"), skip_invalid=True,
                  append_eod=True, log=logs.append)
    (meta,) = summary.values()
    assert meta["documents"] == 2 and meta["skipped_invalid_lines"] == 3
    assert any("skipped 3 invalid line(s)" in m for m in logs)


def test_wrong_tokenizer_file(tmp_path, small_jsonl):
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"not a model")
    r = tool("preprocess_data", "--input", small_jsonl, "--tokenizer-model", bogus, "--output-prefix", tmp_path / "out")
    assert r.returncode == 2 and "not a SentencePiece model" in r.stderr
    _no_outputs(tmp_path)


@pytest.fixture()
def copied(tmp_path, token_prefixes):
    """A private copy of dataset A (its metadata points at the shared tokenizer)."""
    for suffix in (".bin", ".idx", ".json"):
        shutil.copy(token_prefixes[0] + suffix, tmp_path / f"a_text_document{suffix}")
    return str(tmp_path / "a_text_document")


@pytest.mark.parametrize("damage,message", [
    ("truncate_bin", "is 2000 bytes but"),
    ("truncate_idx", "truncated or corrupted"),
    ("bad_header", "not a Megatron index file"),
])
def test_damaged_dataset(tmp_path, copied, damage, message):
    path = copied + (".bin" if damage == "truncate_bin" else ".idx")
    data = open(path, "rb").read()
    data = {"truncate_bin": data[:2000], "truncate_idx": data[:-8], "bad_header": b"XXXX" + data[4:]}[damage]
    open(path, "wb").write(data)
    r = tool("count_tokens", "--data-prefix", copied)
    assert r.returncode == 2 and message in r.stderr and "preprocess_data.py" in r.stderr
    assert not list(tmp_path.glob("*.counts.npy"))
    with pytest.raises(UserError, match=message):
        build_datasets(DataConfig(data_path=[copied], seq_length=32, cache_dir=str(tmp_path / "c")), 10)


def test_tokenizer_larger_than_model_vocab(tmp_path, token_prefixes):
    cfg = DataConfig(data_path=[token_prefixes[0]], seq_length=32, cache_dir=str(tmp_path))
    with pytest.raises(UserError, match=r"has 400 pieces but model.vocab_size=256.*>= 400"):
        build_datasets(cfg, 10, model_vocab_size=256)


def test_dataset_too_small(tmp_path, token_prefixes):
    cfg = DataConfig(data_path=[token_prefixes[0]], seq_length=4096, split="98,1,1", cache_dir=str(tmp_path))
    with pytest.raises(UserError, match=r"the valid split .* fewer than one sequence of data.seq_length\+1=4097"):
        build_datasets(cfg, 10, 10)


def test_blend_with_missing_prefix(tmp_path, token_prefixes):
    missing = str(tmp_path / "nope_text_document")
    cfg = DataConfig(data_path=["0.5", token_prefixes[0], "0.5", missing], seq_length=32, cache_dir=str(tmp_path))
    with pytest.raises(UserError, match=f"data.data_path names dataset prefix {missing}: .*nope_text_document.bin"):
        build_datasets(cfg, 10)
