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


# balance.py: two arms only (its other four are the same code path at other settings)
@pytest.mark.parametrize("script,only", [("routing.py", ""), ("mpoe.py", ""), ("balance.py", "aux_E16,bias_E16")])
def test_quick_study_end_to_end_and_resumable(script, only, tmp_path):
    if not (ROOT / "data" / "corpus_text_document.idx").is_file():
        pytest.skip("needs the corpus: run `make data`")
    out = tmp_path / script.removesuffix(".py")
    extra = ("--only", only) if only else ()
    p = _run(script, out, *extra)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    import importlib

    study = importlib.import_module(script.removesuffix(".py")).STUDY
    rows = {r["arm"]: r for r in summary["rows"]}
    assert set(rows) == ({a.name for a in study.arms} if not only else set(only.split(",")))
    for r in rows.values():
        assert r["seeds"] == 2 and r["valid_ppl_se"] >= 0 and r["valid_ppl"] > 1
        assert r["params_active"] <= r["params_total"]
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert (out / "max_load.png").stat().st_size > 1000
    assert "± " in (out / "summary.md").read_text()
    # resumable: every (arm, seed) is cached, so a rerun trains nothing and rewrites no result
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*.json")}
    p = _run(script, out, *extra)
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


def test_same_as_reuses_the_twin_result_and_trains_it_when_absent(tmp_path, monkeypatch):
    import common

    calls = []
    monkeypatch.setattr(common, "run_one", lambda study, arm, seed, out, quick: calls.append((arm.name, seed))
                        or {"arm": arm.name, "seed": seed, "valid_lm_loss": 1.0})
    monkeypatch.setattr(common, "ROOT", tmp_path)
    twin = tmp_path / "results" / "experiments" / "other" / "a"
    twin.mkdir(parents=True)
    (twin / "seed0.json").write_text(json.dumps({"arm": "a", "seed": 0, "valid_lm_loss": 2.5, "study": "other"}))
    study = common.Study(name="s", base_overrides=[], quick_overrides=[], reference={},
                         arms=[common.Arm("b", [], group="g", same_as="other/a")])
    recs = common.run_study(study, tmp_path / "out", quick=False, seeds=2, only=None)
    assert calls == [("b", 1)]  # seed 0 reused, seed 1 had no twin
    assert recs[0]["valid_lm_loss"] == 2.5 and recs[0]["reused_from"] == "other/a" and recs[0]["arm"] == "b"
    assert json.loads((tmp_path / "out" / "b" / "seed0.json").read_text())["study"] == "s"


def test_paired_seeds_detect_a_gap_the_seed_spread_hides():
    """Arm b is ~0.01 worse than a on every seed, while seeds differ by 0.5: unpaired that is a
    tie, paired over the shared seeds it is 'worse' (with the exact mean difference)."""
    import common

    study = common.Study(name="s", base_overrides=[], quick_overrides=[], reference={"g": "a"},
                         arms=[common.Arm("a", [], group="g"), common.Arm("b", [], group="g"), common.Arm("c", [], group="g")])
    rec = lambda arm, seed, loss: {"arm": arm, "seed": seed, "valid_lm_loss": loss, "params_total": 1,  # noqa: E731
                                   "params_active": 1, "tokens_per_s": 1.0, "moe": {}}
    records = [rec("a", s, 5.0 + 0.5 * s) for s in range(3)] + [rec("b", s, 5.0 + 0.5 * s + d) for s, d in enumerate((0.012, 0.009, 0.01))]
    records += [rec("c", 0, 5.01)]  # one shared seed: falls back to the unpaired rule
    rows = {r["arm"]: r for r in common.summarise(study, records)}
    assert common.verdict(rows["b"]["valid_lm_loss"], rows["b"]["valid_lm_loss_se"],
                          rows["a"]["valid_lm_loss"], rows["a"]["valid_lm_loss_se"]) == "tie"
    assert rows["b"]["vs_reference"] == "worse" and rows["b"]["paired_seeds"] == 3
    assert abs(rows["b"]["delta_loss_vs_reference"] - 0.031 / 3) < 1e-12
    assert "paired_seeds" not in rows["c"] and rows["c"]["vs_reference"] == "tie"
    assert rows["a"]["vs_reference"] == "ref"


def test_a_run_stopped_by_a_signal_is_not_cached(tmp_path, monkeypatch):
    """The trainer turns SIGTERM (e.g. the end of a sitting) into a save and an early return; the
    study must not cache that truncated run as a result."""
    import common

    import megamoe.run_config
    import megamoe.train.trainer
    from megamoe.errors import UserError

    class StoppedTrainer:
        def __init__(self, run):
            pass

        def fit(self):
            return {"finished": False, "step": 7, "stopped_by": "signal 15"}

    monkeypatch.setattr(megamoe.run_config, "load_run_config", lambda path, overrides: None)
    monkeypatch.setattr(megamoe.train.trainer, "Trainer", StoppedTrainer)
    study = common.Study(name="s", base_overrides=[], quick_overrides=[], reference={},
                         arms=[common.Arm("a", [], group="g")])
    with pytest.raises(UserError, match="arm a seed 0 stopped at step 7"):
        common.run_study(study, tmp_path, quick=False, seeds=1, only=None)
    assert not list(tmp_path.glob("*/seed*.json"))
