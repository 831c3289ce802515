"""The claims page (tools/experiments/claims.py): a paper's prediction turns megamoe.stats' verdict
into reproduced / not reproduced / not resolved, a claim waits ("pending") until its arms have
all their seeds with today's code, and the pending ones stay out of Holm's family."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "experiments"))


@pytest.mark.parametrize("predicts, verdict, word", [
    ("tie", "tie", "reproduced"), ("tie", "better", "not reproduced"), ("tie", "worse", "not reproduced"),
    ("better", "better", "reproduced"), ("better", "tie", "not reproduced"), ("better", "worse", "not reproduced"),
    ("not worse", "better", "reproduced"), ("not worse", "tie", "reproduced"), ("not worse", "worse", "not reproduced"),
    ("tie", "not resolved", "not resolved"), ("better", "not resolved", "not resolved"),
    ("not worse", "not resolved", "not resolved"),
])
def test_a_verdict_becomes_a_claim_word_by_what_the_paper_predicts(predicts, verdict, word):
    import claims

    assert claims.claim_word(predicts, verdict) == word


def test_claims_are_paired_one_holm_family_and_wait_for_their_seeds():
    import claims
    from megamoe.stats import verdicts

    C = claims.Claim
    family = [C("tie", "p", "x ties y", "tie", "s", "x", "y"),
              C("gap", "p", "the gap grows", "better", "s", "x", "y", "u", "v"),
              C("half", "p", "z beats y", "better", "s", "z", "y")]
    # x - y is +0.001 +- 0.002 (a tie at 0.01), while u - v is +0.2: the gap (x-y)-(u-v) is -0.2
    noise = [0.002, -0.002, 0.001, -0.001, 0.0]
    losses = {}
    for s, e in enumerate(noise):
        losses.update({("y", s): 5.0, ("x", s): 5.001 + e, ("v", s): 5.0, ("u", s): 5.2 + e / 2})
    losses.update({("z", 0): 4.0, ("z", 1): 4.0})  # 2 of 5 planned seeds: not yet a claim
    planned = {"x": 5, "y": 5, "u": 5, "v": 5, "z": 5}
    rows = {r["name"]: r for r in claims.assess(family, {"s": (losses, planned)})}

    assert rows["half"]["claim"] == "pending" and rows["half"]["seeds"] == 2 and "p_holm" not in rows["half"]
    assert rows["tie"]["claim"] == "reproduced" and rows["tie"]["verdict"] == "tie"
    gap = [(losses[("x", s)] - 5.0) - (losses[("u", s)] - 5.0) for s in range(5)]
    assert rows["gap"]["mean"] == pytest.approx(sum(gap) / 5) and rows["gap"]["claim"] == "reproduced"
    # Holm over the two tested claims only: the same p's as megamoe.stats on that family
    ref = verdicts({"tie": [losses[("x", s)] - 5.0 for s in range(5)], "gap": gap}, margin=0.01)
    assert rows["tie"]["p_holm"] == pytest.approx(ref["tie"].p_adj)
    assert rows["gap"]["p_holm"] == pytest.approx(ref["gap"].p_adj)
    # the third seed of z completes nothing (5 planned); all five make it a claim, Holm over three
    losses.update({("z", s): 4.0 + noise[s] for s in range(2, 5)})
    rows = {r["name"]: r for r in claims.assess(family, {"s": (losses, planned)})}
    assert rows["half"]["claim"] == "reproduced" and rows["half"]["seeds"] == 5
    assert rows["gap"]["p_holm"] >= ref["gap"].p_adj


def test_only_current_results_count_and_the_page_is_written(tmp_path, monkeypatch):
    """A result made by other code or config is left out (the claim stays pending); the command
    writes claims.md and claims.json atomically into the results tree."""
    import claims

    monkeypatch.setattr(claims, "ROOT", tmp_path)
    out = tmp_path / "results" / "experiments" / "balance-quick"
    for arm in ("dropless_bias_E16", "dropless_aux_E16"):
        for seed in (0, 1):
            (out / arm).mkdir(parents=True, exist_ok=True)
            (out / arm / f"seed{seed}.json").write_text(json.dumps(
                {"arm": arm, "seed": seed, "test_lm_loss": 5.0 - 0.1 * (arm == "dropless_bias_E16") + 0.01 * seed,
                 "made_by": "today" if seed == 0 or arm == "dropless_aux_E16" else "yesterday"}))
    monkeypatch.setattr(claims, "stale_reason", lambda rec, overrides: "" if rec["made_by"] == "today" else "code changed")
    losses, planned = claims.current_losses("balance", quick=True)
    assert set(losses) == {("dropless_bias_E16", 0), ("dropless_aux_E16", 0), ("dropless_aux_E16", 1)}
    assert planned["dropless_bias_E16"] == 2  # --quick runs 2 seeds

    assert claims.main(["--quick"]) == 0
    page = (tmp_path / "results" / "experiments" / "claims-quick.md").read_text()
    data = json.loads((tmp_path / "results" / "experiments" / "claims-quick.json").read_text())
    assert "toy size: not a result" in page and "python tools/experiments/claims.py --quick" in page
    assert {r["claim"] for r in data["claims"]} == {"pending"}  # one stale seed keeps the bias claim pending
    assert not list((tmp_path / "results" / "experiments").glob("*.tmp*"))


def test_the_scale_table_is_the_change_of_each_gap_in_its_own_family():
    """The scale question: (a_L - b_L) - (a - b) per seed, each gap alone over its own seeds, a
    Holm family apart from the papers' claims, and words that say which arm the change favours."""
    import claims
    from megamoe.stats import paired_interval, verdicts

    C = claims.Claim
    qs = [C("grows", "", "x - y", "", "s", "xL", "yL", "x", "y"), C("same", "", "u - v", "", "s", "uL", "vL", "u", "v")]
    noise = [0.002, -0.002, 0.001, -0.001, 0.0]
    losses = {}
    for s, e in enumerate(noise):  # x - y is -0.1 small; xL - yL is -0.3 large (3 seeds); u - v is 0 at both
        losses.update({("x", s): 4.9 + e, ("y", s): 5.0, ("u", s): 5.0 + e, ("v", s): 5.0})
        if s < 3:
            losses.update({("xL", s): 4.7 + e / 2, ("yL", s): 5.0, ("uL", s): 5.0 + e / 2, ("vL", s): 5.0})
    planned = {"x": 5, "y": 5, "u": 5, "v": 5, "xL": 3, "yL": 3, "uL": 3, "vL": 3}
    rows = {r["name"]: r for r in claims.assess(qs, {"s": (losses, planned)})}

    assert rows["grows"]["seeds"] == 3 and rows["grows"]["claim"] == "moves toward a"
    assert rows["grows"]["gap_cd"]["seeds"] == 5 and rows["grows"]["gap_ab"]["seeds"] == 3
    assert rows["grows"]["gap_cd"]["mean"] == pytest.approx(paired_interval([4.9 + e - 5.0 for e in noise]).mean)
    assert rows["grows"]["mean"] == pytest.approx(-0.2, abs=1e-3)
    assert rows["same"]["claim"] == "unchanged"
    changes = {"grows": [-0.2 - noise[s] / 2 for s in range(3)],
               "same": [noise[s] / 2 - noise[s] for s in range(3)]}
    ref = verdicts(changes, margin=0.01)
    assert rows["same"]["p_holm"] == pytest.approx(ref["same"].p_adj)
    prov = {"command": "c", "commit": "abc", "machine": "m", "date": "d"}
    page = claims.markdown([], prov, False, 0.01, list(rows.values()))
    assert "## How the gaps change with scale" in page and "**moves toward a**" in page


def test_the_cost_counts_current_runs_and_sweeps_against_the_budget(tmp_path, monkeypatch):
    """The suite's cost is summed from the current results' and LR sweeps' wall_s (a stale run
    is not counted), and the page says whether it fits issue 31's 12 hours on 2 cores."""
    import claims

    monkeypatch.setattr(claims, "ROOT", tmp_path)
    monkeypatch.setattr(claims, "stale_reason", lambda rec, overrides: "" if rec["made_by"] == "today" else "code changed")
    out = tmp_path / "results" / "experiments" / "balance-quick"
    for seed, made_by in ((0, "today"), (1, "today"), (2, "yesterday")):
        (out / "aux_E16").mkdir(parents=True, exist_ok=True)
        (out / "aux_E16" / f"seed{seed}.json").write_text(json.dumps(
            {"arm": "aux_E16", "seed": seed, "test_lm_loss": 5.0, "wall_s": 1800.0, "made_by": made_by}))
    study = claims.importlib.import_module("balance").STUDY
    family = next(iter(study.lr_sweep))
    (out / "lr_sweep" / family).mkdir(parents=True)
    for lr in study.lr_grid:
        (out / "lr_sweep" / family / f"lr{lr:g}.json").write_text(json.dumps({"wall_s": 600.0, "valid_lm_loss": 5.0 + lr, "made_by": "today"}))

    cost = claims.compute("balance", quick=True)
    assert cost == {"study": "balance", "runs": 2, "sweep_runs": len(study.lr_grid),
                    "cpu_hours": pytest.approx(1.0 + len(study.lr_grid) / 6)}
    within = "\n".join(claims.compute_markdown([cost]))
    assert "| all | 2 |" in within and "within issue 31's 12-hour budget" in within
    over = "\n".join(claims.compute_markdown([dict(cost, cpu_hours=30.0)]))
    assert "15.0 hours as 2 single-threaded processes" in over and "over issue 31's" in over
