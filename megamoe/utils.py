"""Small shared helpers: atomic file output, rank-aware printing and progress bars."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds.

    Works for files and directories. A crash or exception leaves no file at ``path`` that
    could be mistaken for a complete output (the temporary name starts with ``.tmp-``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def rank() -> int:
    """Global rank from the launcher's environment (works before torch.distributed init)."""
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def progress(iterable=None, **kwargs):
    """tqdm bar with ETA on rank 0 only (disabled elsewhere)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", not is_rank0())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
