"""Where a committed result came from: the command, the commit, the machine and the date.

Every file under ``results/`` names these four (results/README.md); a generator calls
:func:`provenance` once and writes the dict into its JSON and :func:`markdown_header` at the top
of its markdown, so a rerun that replaces the file keeps them.

Trap: the commit is the tree the result was written from; uncommitted changes to tracked files
are flagged (``+ uncommitted changes``), since then no commit reproduces it exactly.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> str:
    """``abc1234``, ``abc1234 + uncommitted changes``, or ``unknown`` outside a git checkout."""
    head = _git("rev-parse", "--short", "HEAD")
    if head is None:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return f"{head} + uncommitted changes" if dirty else head


def machine() -> str:
    """CPU architecture and cores, the GPU when there is one, Python and torch versions."""
    parts = [f"{platform.machine()}, {os.cpu_count()} cores"]
    try:
        import torch

        if torch.cuda.is_available():
            parts.append(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
        parts.append(f"Python {platform.python_version()}, torch {torch.__version__}")
    except ImportError:
        parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)


def provenance(command: str) -> dict:
    return {"command": command, "commit": commit(), "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown_header(p: dict) -> str:
    """The four lines every results/*.md starts with (after its title), and a blank line."""
    return (f"- command: `{p['command']}`\n- commit: `{p['commit']}`\n- machine: {p['machine']}\n"
            f"- date: {p['date']}\n\n")
