"""The pretraining studies run end to end at toy size (--quick), every arm produces a row with a
standard error, the cache makes a rerun train nothing, and the tie rule is the 2-SE rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "experiments"))

pytestmark = pytest.mark.corpus


def _run(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "tools" / "experiments" / script), "--quick", "--out", str(out),
                           *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("script", ["routing.py", "mpoe.py"])
def test_quick_study_end_to_end_and_resumable(script, tmp_path):
    if not (ROOT / "data" / "corpus_text_document.idx").is_file():
        pytest.skip("needs the corpus: run `make data`")
    out = tmp_path / script.removesuffix(".py")
    p = _run(script, out)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    import importlib

    study = importlib.import_module(script.removesuffix(".py")).STUDY
    rows = {r["arm"]: r for r in summary["rows"]}
    assert set(rows) == {a.name for a in study.arms}
    for r in rows.values():
        assert r["seeds"] == 2 and r["valid_ppl_se"] >= 0 and r["valid_ppl"] > 1
        assert r["params_active"] <= r["params_total"]
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert "± " in (out / "summary.md").read_text()
    # resumable: every (arm, seed) is cached, so a rerun trains nothing and rewrites no result
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*.json")}
    p = _run(script, out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*.json")} == before


def test_unknown_arm_is_a_clear_error(tmp_path):
    p = _run("routing.py", tmp_path, "--only", "switch_top3")
    assert p.returncode == 2 and "unknown arm" in p.stderr and "Traceback" not in p.stderr


def test_two_se_rule():
    from common import verdict

    assert verdict(10.0, 0.1, 10.25, 0.1) == "tie"  # gap 0.25 < 2 * sqrt(0.02) = 0.28
    assert verdict(10.0, 0.1, 10.3, 0.1) == "better"
    assert verdict(10.3, 0.1, 10.0, 0.1) == "worse"
