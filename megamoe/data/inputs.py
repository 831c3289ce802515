"""Input discovery and validation for preprocessing: files, UTF-8, JSON lines, keys.

The fast path reads inputs through ``datasets`` (Arrow); these helpers either check what
Arrow would report badly (invalid UTF-8: checked up front, cheaply, in 16 MiB blocks) or
run only *after* ``datasets`` has failed, to turn its error into ``file:line: cause``.
``clean_copy`` implements ``--skip-invalid``: drop bad lines, count them, keep the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

from megamoe.errors import UserError

BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


def discover(inputs: list[str]) -> tuple[list[Path], str]:
    """Resolve files/directories to a list of files of one kind; return (files, builder)."""
    files: list[Path] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in BUILDERS)
            if not found:
                raise UserError(f"input directory {p} holds no {'/'.join(BUILDERS)} files")
            files += found
        elif p.is_file():
            if p.suffix not in BUILDERS:
                raise UserError(f"input {p}: unsupported extension {p.suffix!r}; use one of "
                                f"{', '.join(BUILDERS)}")
            files.append(p)
        else:
            raise UserError(f"input {p} does not exist; check the --input path")
    kinds = {BUILDERS[f.suffix] for f in files}
    if len(kinds) > 1:
        raise UserError(f"inputs mix formats ({', '.join(sorted(kinds))}); preprocess each format "
                        "separately and blend the prefixes in data.data_path")
    for f in files:
        if f.suffix != ".parquet" and _blank(f):
            raise UserError(f"input {f} is empty (no text); nothing to preprocess: remove it or "
                            "fetch/produce the data again")
    return files, kinds.pop()


def _blank(path: Path, block: int = 1 << 16) -> bool:
    """True when the file holds nothing but whitespace (reads only up to the first text)."""
    with open(path, "rb") as f:
        while chunk := f.read(block):
            if chunk.strip():
                return False
    return True


def first_invalid_utf8(path: Path, block: int = 16 << 20) -> tuple[int, int] | None:
    """(byte offset, line number) of the first invalid UTF-8 byte, or None."""
    offset, lines, carry = 0, 1, b""
    with open(path, "rb") as f:
        while chunk := f.read(block):
            data = carry + chunk
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as e:
                if e.end == len(data) and e.reason == "unexpected end of data" and len(data) - e.start < 4:
                    carry = data[e.start:]  # a character split across blocks
                    data = data[:e.start]
                else:
                    return offset + e.start, lines + data.count(b"\n", 0, e.start)
            offset += len(data)
            lines += data.count(b"\n")
    if carry:
        return offset, lines
    return None


def _bad_line(line: bytes, keys: list[str] | None) -> str | None:
    """Why a jsonl line (or text line when keys is None) is unusable, or None."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"invalid UTF-8 at byte {e.start} of the line"
    if keys is None or not text.strip():
        return None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(rec, dict):
        return "is JSON but not an object"
    for k in keys:
        if not isinstance(rec.get(k), str):
            return f"record has no string field {k!r}" + ("" if k in rec else f" (fields: {', '.join(rec)})")
    return None


def diagnose(path: Path, keys: list[str] | None) -> str | None:
    """``file:line: cause`` for the first unusable line of ``path``, or None."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            why = _bad_line(line, keys)
            if why:
                return f"{path}:{lineno}: {why}"
    return None


def clean_copy(path: Path, keys: list[str] | None, out: Path) -> int:
    """Copy ``path`` to ``out`` without unusable lines; return how many were dropped."""
    dropped = 0
    with open(path, "rb") as f, open(out, "wb") as g:
        for line in f:
            if _bad_line(line, keys):
                dropped += 1
            else:
                g.write(line)
    return dropped
