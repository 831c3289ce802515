"""Fixtures for the data tests: a small trained tokenizer and synthetic indexed datasets.

Everything is session-scoped and tiny (a few hundred KB) to keep tests/data/ fast on 2 cores.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "data" / "raw" / "corpus.jsonl"
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there been one all we their has would when "
         "market river senate congress music theory energy protein planet history language "
         "war peace nation state union people government law trade money science art").split()


def tool(name: str, *args, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``tools/<name>.py`` as a subprocess (as a user would)."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"{name} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def fake_text(rng: random.Random, sentences: int) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        out.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", "!"]))
    return " ".join(out)


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t, "source": "test"}) + "\n")
    return path


@pytest.fixture(scope="session")
def small_jsonl(tmp_path_factory) -> Path:
    rng = random.Random(0)
    texts = [fake_text(rng, rng.randint(1, 30)) for _ in range(120)]
    texts.append(fake_text(rng, 400))  # one document far longer than SentencePiece's 4192-byte line limit
    texts.insert(5, "Unicode: café, naïve, 東京, emoji 🙂.")
    return write_jsonl(tmp_path_factory.mktemp("raw") / "small.jsonl", texts)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, small_jsonl) -> Path:
    """A 400-piece byte-fallback BPE model trained by the CLI tool; returns PREFIX.model."""
    prefix = tmp_path_factory.mktemp("tok") / "spm"
    tool("train_tokenizer", "--input", small_jsonl, "--vocab-size", 400, "--model-type", "bpe",
         "--output-prefix", prefix, "--threads", 1, check=True)
    return prefix.with_suffix(".model")


def make_prefix(prefix: Path, docs: list[np.ndarray], tokenizer_model: Path) -> str:
    """Write an indexed dataset of the given token documents + megamoe metadata."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megamoe.data.tokenizer import tokenizer_metadata, write_json

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for d in docs:
        builder.add_document(np.asarray(d), [len(d)])
    builder.finalize(f"{prefix}.idx")
    meta = tokenizer_metadata(tokenizer_model)
    write_json(f"{prefix}.json", {"tokenizer": {**meta, "path": str(Path(tokenizer_model).resolve())},
                                  "documents": len(docs), "tokens": int(sum(map(len, docs)))})
    return str(prefix)


@pytest.fixture(scope="session")
def token_prefixes(tmp_path_factory, tokenizer):
    """Two datasets whose token ids do not overlap: A uses ids 10..99, B uses 100..199."""
    d = tmp_path_factory.mktemp("indexed")
    rng = np.random.default_rng(0)
    a = [rng.integers(10, 100, rng.integers(20, 200)) for _ in range(400)]
    b = [rng.integers(100, 200, rng.integers(20, 200)) for _ in range(400)]
    return make_prefix(d / "a_text_document", a, tokenizer), make_prefix(d / "b_text_document", b, tokenizer)
