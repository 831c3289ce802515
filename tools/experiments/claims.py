"""The papers' claims against the studies' caches (issue 31): each one reproduced, not reproduced
or not resolved at this scale, with its paired interval. Trains nothing; reads only results made
by today's code and config: a claim is "pending" until every arm in it has all its planned seeds
current, so no word is read off a half-finished study.

    python tools/experiments/claims.py           # results/experiments/claims.md and claims.json
    python tools/experiments/claims.py --quick   # from the --quick caches (toy size: not a result)

Each claim is a paired test-loss comparison over the seeds every arm in it ran: ``a - b`` per seed,
or a difference of two gaps ``(a - b) - (c - d)`` ("the gap grows"). The claims are one family:
megamoe.stats.verdicts with Holm over them, at the studies' ±0.01-nat equivalence margin, so the
same pair can carry a different adjusted p here than in its study's table (a different family).
The verdict word becomes a claim word by what the paper predicts (:func:`claim_word`):

- predicts "tie": tie -> reproduced; better or worse -> not reproduced;
- predicts "better" (lower loss): better -> reproduced; tie or worse -> not reproduced;
- predicts "not worse": better or tie -> reproduced; worse -> not reproduced;
- anything else -> not resolved. A claim is never rounded up from "not resolved".

The page's second table answers issue 31's scale question, which no paper predicts: for hash -
Switch, Switch - dense and hash - dense at E=16 and 64, the gap at each scale and its change from
the small model to the large one ((a_L - b_L) - (a - b)), Holm over those changes alone. The
third says what the suite cost: the CPU-hours of the current results and LR sweeps of each study,
against the issue's budget of 12 hours on 2 cores.

The claims' numbers: the Hash Layers figure (ParlAI ``projects/params_vs_compute/figs``, read off
in ../shared/design/official-code.md), the paper's direction for its ablations (methods.md), the
MPOE abstract ("27.2x reduction in total parameters"), and DeepSeek-V3's ablation of its
auxiliary-loss-free balancing (arXiv 2412.19437, sections 2.1.2 and 4.5.2).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (ROOT, SWEEP_SEED, Study, _sweep_arm, arm_overrides, declared, load_records,  # noqa: E402
                    stale_reason, sweep_records)

PREDICTIONS = ("tie", "better", "not worse")
CLAIM_WORDS = ("reproduced", "not reproduced", "not resolved", "pending")


@dataclass(frozen=True)
class Claim:
    name: str
    paper: str
    says: str  # the claim, with the paper's number
    predicts: str  # what the paper predicts for a - b (or the gap difference): one of PREDICTIONS
    study: str
    a: str
    b: str
    c: str = ""  # with d: the claim is about (a - b) - (c - d)
    d: str = ""

    @property
    def arms(self) -> tuple[str, ...]:
        return tuple(x for x in (self.a, self.b, self.c, self.d) if x)


HASH = "Hash Layers (Roller et al. 2021)"
CLAIMS = (
    Claim("hash_ties_switch_E16", HASH, "balanced hash ties Switch at 16 experts (24.00 vs 24.00 ppl)",
          "tie", "routing", "hash_balanced_E16", "switch_top1_E16"),
    Claim("hash_beats_switch_E64", HASH, "hash beats Switch at 64 experts (23.16 vs 23.65 ppl, -0.021 nats)",
          "better", "routing", "hash_balanced_E64", "switch_top1_E64"),
    Claim("hash_beats_switch_E128", HASH, "hash beats Switch at 128 experts (22.89 vs 23.51 ppl, -0.027 nats)",
          "better", "routing", "hash_balanced_E128", "switch_top1_E128"),
    Claim("hash_gap_grows_16_to_64", HASH, "hash's lead over Switch grows from 16 to 64 experts (0 to -0.021 nats)",
          "better", "routing", "hash_balanced_E64", "switch_top1_E64", "hash_balanced_E16", "switch_top1_E16"),
    Claim("random_hash_beats_switch_E64", HASH, "random hash beats Switch at 64 experts (direction)",
          "better", "routing", "hash_random_E64", "switch_top1_E64"),
    Claim("balanced_not_worse_than_random_E64", HASH, "balanced is the best hash: not worse than random at 64",
          "not worse", "routing", "hash_balanced_E64", "hash_random_E64"),
    Claim("position_hash_ties_dense", HASH, "a position hash is about as good as dense (a control)",
          "tie", "routing", "hash_position_E64", "dense"),
    Claim("oracle_hash_beats_balanced", HASH, "routing by the next token (oracle) is far below every hash",
          "better", "routing", "hash_oracle_future_E64", "hash_balanced_E64"),
    Claim("mpo_matches_switch_at_27x", "MPOE (Gao et al. 2022)",
          "MPO experts match or beat Switch with 27.2x fewer total parameters (here 28x: E=256, bond 4)",
          "not worse", "mpoe", "mpo_b4_E256", "switch_E256"),
    Claim("expert_bias_beats_aux_loss", "DeepSeek-V3 (2024)",
          "the aux-loss-free expert bias gives a better model than the aux loss (dropless, E=16)",
          "better", "balance", "dropless_bias_E16", "dropless_aux_E16"),
)

# Issue 31's scale question, not a paper's claim (no prediction): does a gap a - b grow or shrink
# from the small model (D=128, 400 steps) to the large one (2x width, 2x tokens)? Each is the
# paired change (a_L - b_L) - (a - b), its own Holm family.
SCALE_PAIRS = (("hash_balanced", "switch_top1"), ("switch_top1", "dense"), ("hash_balanced", "dense"))
SCALE = tuple(
    Claim(f"{a}_vs_{b}_E{E}", "", f"{a} - {b} at E={E}", "", "routing",
          f"{a}_L_E{E}", "dense_L" if b == "dense" else f"{b}_L_E{E}", f"{a}_E{E}", "dense" if b == "dense" else f"{b}_E{E}")
    for E in (16, 64) for a, b in SCALE_PAIRS)
# "better": the change is negative, so a's lead over b is larger (or its deficit smaller) at scale
SCALE_WORDS = {"better": "moves toward a", "worse": "moves toward b", "tie": "unchanged", "not resolved": "not resolved"}


def claim_word(predicts: str, verdict_word: str) -> str:
    """The claim word for a verdict word of megamoe.stats (better / worse / tie / not resolved);
    no prediction (a scale question): how the gap moves (:data:`SCALE_WORDS`)."""
    if not predicts:
        return SCALE_WORDS[verdict_word]
    if predicts not in PREDICTIONS:
        raise ValueError(f"predicts must be one of {PREDICTIONS}, got {predicts!r}")
    if verdict_word == "not resolved":
        return "not resolved"
    holds = {"tie": ("tie",), "better": ("better",), "not worse": ("better", "tie")}[predicts]
    return "reproduced" if verdict_word in holds else "not reproduced"


def _cache(study_name: str, quick: bool) -> Path:
    return ROOT / "results" / "experiments" / (study_name + ("-quick" if quick else ""))


def current_records(study_name: str, quick: bool) -> list[dict]:
    """The study's cached (arm, seed) results made by today's code and config."""
    study = importlib.import_module(study_name).STUDY
    out = _cache(study_name, quick)
    arms = {a.name: a for a in study.arms}
    return [rec for rec in (load_records(out) if out.is_dir() else [])
            if rec["arm"] in arms and "test_lm_loss" in rec
            and not stale_reason(rec, arm_overrides(study, arms[rec["arm"]], rec["seed"], quick, out))]


def current_losses(study_name: str, quick: bool) -> tuple[dict[tuple[str, int], float], dict[str, int]]:
    """{(arm, seed): test loss} of the study's current results (:func:`current_records`), and
    {arm: seeds the study plans for it} (as its run_study counts them: --quick runs 2)."""
    study = importlib.import_module(study_name).STUDY
    seeds = 2 if quick else study.seeds
    planned = {a.name: min(seeds, a.seeds or seeds) for a in study.arms}
    return {(r["arm"], r["seed"]): r["test_lm_loss"] for r in current_records(study_name, quick)}, planned


def compute(study_name: str, quick: bool) -> dict:
    """What the study's current results cost: its (arm, seed) runs and LR-sweep runs made by
    today's code, and the CPU-hours they took (each ran as one single-threaded process, so its
    ``wall_s`` is its CPU time; process start-up and an upcycled arm's preparation are not in it)."""
    study = importlib.import_module(study_name).STUDY
    out = _cache(study_name, quick)
    sweeps = [rec for family in study.lr_sweep for lr, rec in sweep_records(study, out, family).items()
              if not stale_reason(rec, declared(study, _sweep_arm(study, family), SWEEP_SEED, quick, lr))]
    runs = current_records(study_name, quick)
    return {"study": study_name, "runs": len(runs), "sweep_runs": len(sweeps),
            "cpu_hours": sum(r.get("wall_s", 0.0) for r in runs + sweeps) / 3600}


def paired_diffs(claim: Claim, losses: dict[tuple[str, int], float]) -> list[float]:
    """Per-seed a - b (or (a - b) - (c - d)) over the seeds every arm of the claim has."""
    seeds = sorted(set.intersection(*({s for (a, s) in losses if a == arm} for arm in claim.arms)))
    out = []
    for s in seeds:
        d = losses[(claim.a, s)] - losses[(claim.b, s)]
        if claim.c:
            d -= losses[(claim.c, s)] - losses[(claim.d, s)]
        out.append(d)
    return out


def assess(claims, by_study: dict, margin: float = Study.margin) -> list[dict]:
    """One row per claim: its claim word and the paired interval. ``by_study``: {study: (losses,
    planned)} as :func:`current_losses` returns them. A claim whose arms lack planned seeds is
    "pending" and stays out of Holm's family (the family is the claims that can be tested)."""
    from megamoe.stats import paired_interval, verdicts

    def complete(c: Claim) -> bool:
        losses, planned = by_study.get(c.study, ({}, {}))
        return all(sum(1 for (a, _) in losses if a == arm) >= max(2, planned.get(arm, 2)) for arm in c.arms)

    diffs = {c.name: paired_diffs(c, by_study.get(c.study, ({}, {}))[0]) for c in claims}
    tested = {c.name: diffs[c.name] for c in claims if complete(c) and len(diffs[c.name]) >= 2}
    vs = verdicts(tested, margin=margin) if tested else {}
    rows = []
    for c in claims:
        row = {**asdict(c), "seeds": len(diffs[c.name])}
        v = vs.get(c.name)
        if v is None:
            row["claim"] = "pending"
        else:
            row.update(claim=claim_word(c.predicts, v.word), verdict=v.word, mean=v.mean, lo=v.lo, hi=v.hi,
                       p_holm=v.p_adj, p_tost_holm=v.p_tost_adj)
        if c.c:  # each gap alone, over all its seeds: a - b, c - d
            losses = by_study.get(c.study, ({}, {}))[0]
            for key, (x, y) in (("gap_ab", (c.a, c.b)), ("gap_cd", (c.c, c.d))):
                d = paired_diffs(Claim("", "", "", "", c.study, x, y), losses)
                if len(d) >= 2:
                    i = paired_interval(d)
                    row[key] = {"mean": i.mean, "lo": i.lo, "hi": i.hi, "seeds": i.n}
        rows.append(row)
    return rows


def _ci(r: dict) -> str:
    return f"{r['mean']:+.4f}" + ("" if math.isnan(r["lo"]) else f" [{r['lo']:+.4f}, {r['hi']:+.4f}]")


def scale_markdown(rows: list[dict], margin: float) -> list[str]:
    m = sum(1 for r in rows if r["claim"] != "pending")
    lines = ["", "## How the gaps change with scale", "",
             "Not a paper's claim: issue 31 asks whether the gaps grow or shrink from the small model (D=128, "
             "400 steps) to the large one (D=256, 800 steps, the small scale's LRs). Each gap is a paired "
             "test-loss difference over its own seeds; the change is (a - b) at the large scale minus (a - b) "
             f"at the small one over the seeds both ran, Holm over these {m} changes (a family of its own); "
             f"`unchanged`: the TOST at ±{margin} nats passes; `moves toward a`: a's lead grows or its "
             "deficit shrinks.", "",
             "| comparison | small: a - b [95% CI] | large: a - b [95% CI] | seeds | change [95% CI] | p (Holm) | "
             "with scale |", "|" + "---|" * 7]
    for r in rows:
        small, large = (_ci(r[k]) if k in r else "" for k in ("gap_cd", "gap_ab"))
        change, p = ("", "") if r["claim"] == "pending" else (_ci(r), f"{r['p_holm']:.3g}")
        lines.append(f"| {r['says']} | {small} | {large} | {r['seeds']} | {change} | {p} | **{r['claim']}** |")
    return lines


# Issue 31's budget: the whole suite in at most 12 hours of a 2-core machine, run as two
# single-threaded processes (the studies' own instruction).
BUDGET_HOURS, CORES = 12.0, 2


def compute_markdown(costs: list[dict]) -> list[str]:
    total = sum(c["cpu_hours"] for c in costs)
    wall = total / CORES
    lines = ["", "## What the suite cost", "",
             "The CPU-hours of the results these tables read (today's code: each study's (arm, seed) runs "
             "and its LR sweep), summed from each run's `wall_s`; runs left stale by later code and runs "
             "stopped midway are not counted.", "",
             "| study | runs | LR-sweep runs | CPU-hours |", "|---|---|---|---|"]
    lines += [f"| {c['study']} | {c['runs']} | {c['sweep_runs']} | {c['cpu_hours']:.1f} |" for c in costs]
    lines += [f"| all | {sum(c['runs'] for c in costs)} | {sum(c['sweep_runs'] for c in costs)} | {total:.1f} |", "",
              f"{total:.1f} CPU-hours is {wall:.1f} hours as {CORES} single-threaded processes on {CORES} cores: "
              + ("within" if wall <= BUDGET_HOURS else "over") + f" issue 31's {BUDGET_HOURS:g}-hour budget."]
    return lines


def markdown(rows: list[dict], prov: dict, quick: bool, margin: float, scale: list[dict] = (),
             costs: list[dict] = ()) -> str:
    from megamoe.provenance import markdown_header

    m = sum(1 for r in rows if r["claim"] != "pending")
    lines = [f"# The papers' claims at this scale{' (--quick, toy size: not a result)' if quick else ''}", "",
             markdown_header(prov) + "Each claim is a paired test-loss difference over seeds (a - b, or "
             "(a - b) - (c - d) for a growing gap; negative: a is better), with its 95 % t-interval. "
             f"`p (Holm)` is adjusted over the {m} tested claims; the verdict is megamoe.stats' "
             f"(tie: the Holm-adjusted TOST at ±{margin} nats passes), and the claim word follows from "
             "what the paper predicts (tools/experiments/claims.py). `pending`: an arm of the claim has not "
             "run all its seeds with today's code (`seeds`: those paired so far). The studies' tables: results/experiments/<study>/summary.md.", "",
             "| paper | claim | study | comparison | predicts | seeds | Δ test loss [95% CI] | p (Holm) | verdict | "
             "at this scale |", "|" + "---|" * 10]
    for r in rows:
        comp = f"{r['a']} - {r['b']}" + (f" - ({r['c']} - {r['d']})" if r["c"] else "")
        delta, p, verdict = ("", "", "") if r["claim"] == "pending" else (_ci(r), f"{r['p_holm']:.3g}", r["verdict"])
        lines.append(f"| {r['paper']} | {r['says']} | {r['study']} | {comp} | {r['predicts']} | {r['seeds']} | "
                     f"{delta} | {p} | {verdict} | **{r['claim']}** |")
    if scale:
        lines += scale_markdown(scale, margin)
    if costs:
        lines += compute_markdown(costs)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from megamoe.provenance import provenance
    from megamoe.utils import atomic_write_text, print0

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="read the --quick caches (toy size: not a result)")
    args = p.parse_args(argv)
    studies = ("routing", "mpoe", "balance")
    losses = {s: current_losses(s, args.quick) for s in studies}
    costs = [compute(s, args.quick) for s in studies]
    margin = Study.margin  # the studies' own equivalence margin
    rows = assess(CLAIMS, losses, margin)
    scale = assess(SCALE, losses, margin)
    prov = provenance("python tools/experiments/claims.py" + (" --quick" if args.quick else ""))
    out = ROOT / "results" / "experiments" / ("claims-quick" if args.quick else "claims")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {**prov, "margin": margin, "claims": rows, "scale": scale, "compute": costs}
    atomic_write_text(out.with_suffix(".json"), json.dumps(data, indent=1) + "\n")
    md = markdown(rows, prov, args.quick, margin, scale, costs)
    atomic_write_text(out.with_suffix(".md"), md)
    print0(md)
    print0(f"wrote {out}.md and .json")
    return 0


if __name__ == "__main__":
    from megamoe.errors import cli_main

    cli_main(main)()
