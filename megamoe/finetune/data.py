"""Multi-task classification data: data/tasks/<task>.jsonl (tools/fetch_tasks.py) -> token tensors.

Each example is tokenised with the project SentencePiece model, truncated to ``seq_len``
(keeping the start: topic and spam cues are early) and right-padded with id 0; ``lengths``
points the classifier at the last real token.

Splits, per task (issue 29: every choice is made on validation, the test split is read once,
for the final tables):

- validation: ``max_valid`` examples carved from the task's *train* rows with a fixed seed (the
  same for every run and seed, so validation results pair across arms); never trained on;
- train: at most ``max_train`` examples drawn with the run's seed from the train rows left over;
- test: at most ``max_test`` of the task's test rows with a fixed seed, untouched by the carving.
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


def subset(split: TaskSplit, task: int) -> TaskSplit:
    """The examples of one task (task ids kept: the classifier's head slice is the task's)."""
    keep = split.tasks == task
    return TaskSplit(split.ids[keep], split.lengths[keep], split.labels[keep], split.tasks[keep])


def _document(row: dict) -> str:
    """The unit a split must not cut: a Brown passage's document ("brown/<doc>/<i>"; fetch_tasks
    splits train/test by document for the same reason), else the example itself."""
    return row["id"].rsplit("/", 1)[0] if row["id"].startswith("brown/") else row["id"]


def _carve(train: list[dict], task: str, max_valid: int) -> tuple[list[dict], list[dict]]:
    """(validation, rest) of a task's train rows: whole documents in a fixed shuffled order until
    ``max_valid`` examples (at most a fifth of the rows), the same for every run and seed."""
    docs = sorted({_document(r) for r in train})
    random.Random(f"{task}/valid").shuffle(docs)
    want, chosen, n = min(max_valid, len(train) // 5), set(), 0
    counts = {}
    for r in train:
        counts[_document(r)] = counts.get(_document(r), 0) + 1
    for d in docs:
        if n >= want:
            break
        chosen.add(d)
        n += counts[d]
    valid = [r for r in train if _document(r) in chosen][:max_valid]
    return valid, [r for r in train if _document(r) not in chosen]


def load_tasks(task_dir: str | Path, tasks: list[str], tokenizer: str, seq_len: int, max_train: int,
               max_test: int, seed: int = 0, max_valid: int = 200) -> tuple[dict, TaskSplit, TaskSplit, TaskSplit]:
    """Return (manifest entries per task, train, validation, test splits) over all tasks."""
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
    out = {"train": [], "valid": [], "test": []}
    for t, task in enumerate(tasks):
        rows = [json.loads(ln) for ln in (task_dir / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()]
        valid, pool = _carve(sorted((r for r in rows if r["split"] == "train"), key=lambda r: r["id"]), task,
                             max_valid)
        test = [r for r in rows if r["split"] == "test"]
        random.Random(f"{task}/{seed}").shuffle(pool)  # the run's training draw
        random.Random(f"{task}/0").shuffle(test)       # the same test examples for every run
        for split, part in (("train", pool[:max_train]), ("valid", valid), ("test", test[:max_test])):
            out[split] += [(r["text"], r["label"], t) for r in part]
    splits = []
    for split in ("train", "valid", "test"):
        texts, labels, task_ids = zip(*out[split])
        ids, lengths = _encode(sp, list(texts), seq_len)
        splits.append(TaskSplit(ids, lengths, torch.tensor(labels), torch.tensor(task_ids)))
    return {t: manifest[t] for t in tasks}, *splits
