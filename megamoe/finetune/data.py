"""Multi-task classification data: data/tasks/<task>.jsonl (tools/fetch_tasks.py) -> token tensors.

Each example is tokenised with the project SentencePiece model, truncated to ``seq_len``
(keeping the start: topic and spam cues are early) and right-padded with id 0; ``lengths``
points the classifier at the last real token. Per task, at most ``max_train`` training examples
are drawn with the run's seed (the same for every method) and at most ``max_test`` test examples
with a fixed seed (the same for every run, so per-example results pair across methods).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from megamoe.errors import UserError


@dataclass
class TaskSplit:
    ids: torch.Tensor       # [N, S] long, right-padded
    lengths: torch.Tensor   # [N] long, >= 1
    labels: torch.Tensor    # [N] long, task-local class
    tasks: torch.Tensor     # [N] long, task index


def _encode(sp, texts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(texts), seq_len, dtype=torch.long)
    lengths = torch.ones(len(texts), dtype=torch.long)
    for i, pieces in enumerate(sp.encode(texts)):
        pieces = pieces[:seq_len] or [0]
        ids[i, :len(pieces)] = torch.tensor(pieces)
        lengths[i] = len(pieces)
    return ids, lengths


def load_tasks(task_dir: str | Path, tasks: list[str], tokenizer: str, seq_len: int, max_train: int,
               max_test: int, seed: int = 0) -> tuple[dict, TaskSplit, TaskSplit]:
    """Return (manifest entries per task, train split, test split) over all tasks."""
    import sentencepiece as spm

    task_dir = Path(task_dir)
    manifest_path = task_dir / "SOURCES.json"
    if not manifest_path.exists():
        raise UserError(f"{manifest_path} not found: run 'python tools/fetch_tasks.py --out {task_dir}' first")
    manifest = json.loads(manifest_path.read_text())
    missing = [t for t in tasks if t not in manifest or not (task_dir / f"{t}.jsonl").exists()]
    if missing:
        raise UserError(f"tasks {missing} not in {task_dir}: run 'python tools/fetch_tasks.py --tasks {','.join(missing)}'")
    if not Path(tokenizer).exists():
        raise UserError(f"tokenizer {tokenizer} not found (train one with tools/train_tokenizer.py or pass --tokenizer)")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    out = {"train": [], "test": []}
    for t, task in enumerate(tasks):
        rows = [json.loads(ln) for ln in (task_dir / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()]
        for split, cap in (("train", max_train), ("test", max_test)):
            part = [r for r in rows if r["split"] == split]
            # the training draw follows the run's seed; the test set is the same for every run
            random.Random(f"{task}/{seed if split == 'train' else 0}").shuffle(part)
            out[split] += [(r["text"], r["label"], t) for r in part[:cap]]
    splits = []
    for split in ("train", "test"):
        texts, labels, task_ids = zip(*out[split])
        ids, lengths = _encode(sp, list(texts), seq_len)
        splits.append(TaskSplit(ids, lengths, torch.tensor(labels), torch.tensor(task_ids)))
    return {t: manifest[t] for t in tasks}, splits[0], splits[1]
