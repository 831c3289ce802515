"""Opening and checking Megatron indexed datasets (``PREFIX.bin`` / ``PREFIX.idx``) and
the metadata JSON that megamoe writes beside them (``PREFIX.json``).

megatron-core's reader trusts its files: a truncated ``.bin`` is memory-mapped and fails
(or returns garbage) only when a sample past the end is read, and a damaged ``.idx`` trips
a bare ``assert``. :func:`open_indexed` checks the header, the index size and that the
``.bin`` length equals what the index points to, and turns every problem into a
:class:`UserError` naming the file and the fix (re-run ``tools/preprocess_data.py``).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from megamoe.errors import UserError

_HEADER = b"MMIDIDX\x00\x00"
_FIX = "re-create it with tools/preprocess_data.py"
# megatron-core's DType codes (indexed_dataset.DType), copied so that checking a dataset does
# not import megatron-core (seconds); tests/data/test_indexed.py holds them equal.
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}


def meta_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.json")


def read_meta(prefix: str | Path) -> dict | None:
    """The megamoe metadata of a dataset prefix, or None (e.g. built by Megatron-LM itself)."""
    path = meta_path(prefix)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"dataset metadata {path} is not valid JSON ({e}); {_FIX}") from None


def tokenizer_path_from_meta(prefix: str | Path, meta: dict) -> Path:
    """The tokenizer ``.model`` recorded in the metadata, resolved relative to the metadata."""
    p = Path(meta["tokenizer"]["path"])
    return p if p.is_absolute() else (meta_path(prefix).parent / p)


def check_files(prefix: str | Path, what: str = "dataset prefix") -> None:
    """Raise UserError unless ``PREFIX.bin`` and ``PREFIX.idx`` both exist."""
    missing = [s for s in (".bin", ".idx") if not os.path.isfile(f"{prefix}{s}")]
    if missing:
        raise UserError(f"{what} {prefix}: {' and '.join(str(prefix) + s for s in missing)} "
                        f"not found; build it with tools/preprocess_data.py "
                        "(prefixes end in _text_document, without .bin/.idx)")


def verify_files(prefix: str | Path) -> tuple[int, int, np.dtype]:
    """Check header/sizes of ``PREFIX.idx`` against ``PREFIX.bin`` without megatron's asserts.

    Returns (num_sequences, num_documents, token dtype).
    """
    check_files(prefix)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    raw = idx.read_bytes()
    if len(raw) < 34 or raw[:9] != _HEADER:
        raise UserError(f"{idx} is not a Megatron index file (bad header or truncated); {_FIX}")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", raw[9:34])
    if version != 1:
        raise UserError(f"{idx} has index version {version}, expected 1; {_FIX}")
    if code not in DTYPE_CODES:
        raise UserError(f"{idx} names unknown token dtype code {code} (corrupted); {_FIX}")
    dtype = np.dtype(DTYPE_CODES[code])
    expected = 34 + n_seq * (4 + 8) + n_doc * 8
    if len(raw) != expected:
        raise UserError(f"{idx} is {len(raw)} bytes but its header implies {expected} "
                        f"(truncated or corrupted); {_FIX}")
    lengths = np.frombuffer(raw, np.int32, n_seq, 34)
    pointers = np.frombuffer(raw, np.int64, n_seq, 34 + 4 * n_seq)
    docs = np.frombuffer(raw, np.int64, n_doc, 34 + 12 * n_seq)
    if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq or np.any(np.diff(docs) < 0) or np.any(lengths < 0):
        raise UserError(f"{idx} has an inconsistent document index (corrupted); {_FIX}")
    want_bin = int(pointers[-1] + lengths[-1] * dtype.itemsize) if n_seq else 0
    have_bin = bin_.stat().st_size
    if have_bin != want_bin:
        raise UserError(f"{bin_} is {have_bin} bytes but {idx} indexes {want_bin} bytes "
                        f"(truncated, corrupted, or from another run); {_FIX}")
    return n_seq, n_doc - 1, dtype


def open_indexed(prefix: str | Path):
    """Verified ``megatron.core.datasets.indexed_dataset.IndexedDataset`` for ``prefix``."""
    verify_files(prefix)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix), multimodal=False, mmap=True)
