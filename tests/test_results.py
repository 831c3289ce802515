"""results/ holds the current result of each benchmark and study, one file each, naming its
command, commit, machine and date, with repository-relative paths (results/README.md); reruns
replace the file and git keeps the earlier ones."""

import re
import subprocess
from pathlib import Path

from megamoe.provenance import markdown_header, provenance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
# the result pages: each benchmark's and study's markdown (not the per-arm caches)
PAGES = sorted([*RESULTS.glob("*.md"), *RESULTS.glob("experiments/*/summary.md"), *RESULTS.glob("analysis/*/README.md")])
PAGES = [p for p in PAGES if p != RESULTS / "README.md"]


def test_every_result_names_command_commit_machine_and_date():
    assert len(PAGES) >= 9
    missing = [f"{p.relative_to(ROOT)}: {field}" for p in PAGES for field in ("command", "commit", "machine", "date")
               if not re.search(rf"^- {field}: \S", p.read_text(encoding="utf-8"), re.M)]
    assert missing == []


def test_one_current_file_per_result():
    copies = [p.name for p in RESULTS.rglob("*")
              if re.search(r"_(20\d\d-\d\d-\d\d|rerun|noisy|malloc|threads1|plain|32r|clip)", p.name)]
    assert copies == [], "a rerun replaces the file; the earlier one stays in git"


def _committable(folder: Path) -> list[Path]:
    """The files under ``folder`` that git tracks or would add: the study runs' local checkpoints
    and logs (``*.run/``, git-ignored) name this machine's paths and are never committed."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", str(folder)],
                            cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:  # not a git checkout: every file
        return [p for p in folder.rglob("*") if p.is_file()]
    return [ROOT / line for line in listed.stdout.splitlines() if (ROOT / line).is_file()]


def test_results_name_no_machine_paths():
    found = [str(p.relative_to(ROOT)) for p in _committable(RESULTS) if p.suffix in (".json", ".md")
             and re.search(r"(?<![\w.])/(work|tmp|home|root|Users)/", p.read_text(encoding="utf-8"))]
    assert found == []


def test_the_index_lists_every_result():
    index = (RESULTS / "README.md").read_text(encoding="utf-8")
    assert [str(p.relative_to(RESULTS)) for p in PAGES if f"]({p.relative_to(RESULTS)})" not in index] == []


def test_provenance_fields():
    p = provenance("python tools/x.py")
    assert re.fullmatch(r"[0-9a-f]{7,}( \+ uncommitted changes)?|unknown", p["commit"])
    assert "cores" in p["machine"] and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", p["date"])
    assert markdown_header(p).startswith("- command: `python tools/x.py`\n- commit: ")
