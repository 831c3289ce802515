"""Shared machinery of the pretraining studies (routing.py, mpoe.py): resumable (arm, seed) runs,
mean +- standard error, a markdown table, JSON and loss-curve PNGs.

Design:
- One process runs a whole study; each (arm, seed) is one in-process ``Trainer`` run (a world of
  one, gloo) so the framework is imported once (the ``--quick`` study fits in a few minutes).
- Resumable: the result of each (arm, seed) is written atomically to
  ``<out>/<arm>/seed<k>.json`` as soon as it finishes; a finished pair is never rerun (delete
  the file to rerun it). Killing a study loses at most the run in progress.
- Seeds vary both the model init (``train.seed``) and the data order (``data.seed``).
- Fixed token budget: every arm of a study trains the same number of steps at the same batch
  size and sequence length.
- Statistics: mean and standard error (sample std / sqrt(n)) over seeds of the final validation
  loss, reported as perplexity exp(mean loss) with the SE carried through (ppl x SE of the loss).
  A difference inside 2 SE is reported as a tie (:func:`verdict`).
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megamoe.utils import atomic_path, atomic_write_text, mean_se, print0, progress  # noqa: E402

# The studies' corpus split: train, valid (LR selection), test (every reported number). Not the
# demo's 98,2,0, which has no test split.
SPLIT = "96,2,2"
DATA = f"{ROOT}/data/corpus_text_document"
# Unigram counts of THIS split's train part for the balanced hash tables (the demo's
# corpus_text_document.counts.npy counts 98 % of the documents, which would include the
# studies' valid split). Built on first use by :func:`ensure_counts`.
COUNTS = f"{DATA}.counts.split{SPLIT.replace(',', '-')}.npy"


def ensure_counts() -> None:
    """Write :data:`COUNTS` from the corpus when it is missing (tools/count_tokens.py's rule)."""
    if not Path(COUNTS).is_file():
        sys.path.insert(0, str(ROOT / "tools"))
        from count_tokens import write_counts

        write_counts(DATA, SPLIT, COUNTS)


def evaluate_test(trainer, run, batches: int) -> dict:
    """Loss on the test split, by the trainer's own evaluation (the same code as its valid loss),
    over ``batches`` micro-batches: selection reads valid, reports read this."""
    from megamoe.data import build_datasets, build_loader
    from megamoe.train.trainer import evaluate

    mbs = run.train.micro_batch_size
    test = build_datasets(run.data, 0, 0, batches * mbs, model_vocab_size=run.model.vocab_size)[2]
    return evaluate(trainer.engine, lambda: build_loader(test, mbs, mbs), batches, trainer.device)


@dataclass
class Arm:
    name: str
    overrides: list[str]
    group: str = ""  # table section (e.g. "E=16")
    note: str = ""  # shown in the table (e.g. "analysis only")
    prepare: object = None  # callable(arm, seed, run_dir) -> extra overrides, run before training
    # "<study>/<arm>": the same configuration and seeds as that arm of another study; its cached
    # full-size result is reused (copied, marked) instead of rerun. Trained here when absent.
    same_as: str = ""


@dataclass
class Study:
    name: str
    base_overrides: list[str]  # the full-size model and token budget
    quick_overrides: list[str]  # toy size for --quick (appended after base)
    arms: list[Arm]
    reference: dict  # {group: arm} each group's rows are compared with
    seeds: int = 5
    test_batches: int = 48  # micro-batches of the test split per run (48 x 16 x 128: ~ the whole split)
    describe: str = ""
    extra: dict = field(default_factory=dict)


def verdict(a_mean: float, a_se: float, b_mean: float, b_se: float) -> str:
    """'better' / 'worse' / 'tie' of a vs b (lower is better), with the 2-SE rule on the
    difference (SEs combined in quadrature)."""
    se = math.sqrt((a_se if math.isfinite(a_se) else 0) ** 2 + (b_se if math.isfinite(b_se) else 0) ** 2)
    d = a_mean - b_mean
    if se == 0 or abs(d) <= 2 * se:
        return "tie"
    return "better" if d < 0 else "worse"


def run_one(study: Study, arm: Arm, seed: int, out: Path, quick: bool) -> dict:
    """Train one (arm, seed) in this process and return its result record."""
    import torch

    from megamoe.run_config import load_run_config
    from megamoe.train.trainer import Trainer

    run_dir = out / arm.name / f"seed{seed}.run"
    # quick last: the toy size wins over an arm's own step count
    overrides = list(study.base_overrides) + list(arm.overrides) + (list(study.quick_overrides) if quick else [])
    if arm.prepare is not None:
        overrides += arm.prepare(arm, seed, run_dir, overrides)
    overrides += [
        f"train.seed={1000 + seed}", f"data.seed={2000 + seed}",
        f"train.save_dir={run_dir}/checkpoints", f"train.log_dir={run_dir}/logs",
        "train.tensorboard=false", "train.plot=false", "train.keep_last=1"]
    if any(COUNTS in o for o in overrides):
        ensure_counts()
    run = load_run_config(None, overrides)
    t0 = time.perf_counter()
    trainer = Trainer(run)
    result = trainer.fit()
    if not result["finished"]:  # SIGTERM/SIGINT: the trainer saved and stopped early
        from megamoe.errors import UserError

        raise UserError(f"{study.name}: arm {arm.name} seed {seed} stopped at step {result['step']} "
                        f"({result['stopped_by']}); not cached, so rerunning the study redoes it")
    test = evaluate_test(trainer, run, 2 if quick else study.test_batches)
    wall = time.perf_counter() - t0
    hist = trainer.metrics.history
    train = [h for h in hist if h["split"] == "train"]
    valid = [h for h in hist if h["split"] == "valid"]
    steady = train[len(train) // 5:] or train  # skip the warm-up steps when timing
    moe_keys = sorted({k for h in train for k in h if k.startswith("moe/") and not k.endswith("expert_load")})
    rec = {
        "study": study.name, "arm": arm.name, "group": arm.group, "seed": seed, "quick": quick,
        "valid_lm_loss": result["valid"]["lm_loss"], "valid_ppl": result["valid"]["ppl"],
        "test_lm_loss": test["lm_loss"], "test_ppl": test["ppl"], "test_tokens": test["tokens"],
        "params_total": result["params"]["total"], "params_active": result["params"]["active"],
        "tokens_per_s": sum(h["tokens_per_s"] for h in steady) / len(steady),
        "train_curve": [[h["step"], h["lm_loss"]] for h in train],
        "valid_curve": [[h["step"], h["lm_loss"]] for h in valid],
        "moe": {k: sum(h[k] for h in train if k in h) / max(1, sum(1 for h in train if k in h)) for k in moe_keys},
        "max_load_curve": {k: [[h["step"], h[k]] for h in train if k in h] for k in moe_keys if k.endswith("max_load")},
        "entropy_curve": {k: [[h["step"], h[k]] for h in train if k in h] for k in moe_keys
                          if k.endswith("router_entropy")},
        "wall_s": wall, "overrides": overrides,
        "checkpoint": result["checkpoint"],
    }
    del trainer
    gc.collect()
    torch.manual_seed(0)
    return rec


def run_study(study: Study, out: Path, quick: bool, seeds: int, only: list[str] | None) -> list[dict]:
    records = []
    todo = [(a, s) for a in study.arms if not only or a.name in only for s in range(seeds)]
    bar = progress(todo, desc=study.name, unit="run")
    for arm, seed in bar:
        path = out / arm.name / f"seed{seed}.json"
        bar.set_postfix(arm=arm.name, seed=seed)
        if path.is_file():
            records.append(json.loads(path.read_text()))
            continue
        twin = ROOT / "results" / "experiments" / arm.same_as / f"seed{seed}.json"
        if arm.same_as and not quick and twin.is_file():
            rec = dict(json.loads(twin.read_text()), study=study.name, arm=arm.name, group=arm.group,
                       reused_from=arm.same_as)
        else:
            rec = run_one(study, arm, seed, out, quick)
        # paths relative to the repository: committed results name no machine's directories
        atomic_write_text(path, json.dumps(rec, indent=1).replace(f"{ROOT}/", "") + "\n")
        records.append(rec)
    return records


def load_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/seed*.json"))]


def summarise(study: Study, records: list[dict]) -> list[dict]:
    """One row per arm: mean +- SE of the valid loss and ppl, params, speed, MoE scalars."""
    rows = []
    by_arm = {}
    for r in records:
        by_arm.setdefault(r["arm"], []).append(r)
    for arm in study.arms:
        rs = by_arm.get(arm.name)
        if not rs:
            continue
        loss, loss_se = mean_se([r["valid_lm_loss"] for r in rs])
        moe_means = {}
        for k in sorted({k for r in rs for k in r["moe"]}):
            name = k.split("/")[-1]
            vals = [r["moe"][k] for r in rs if k in r["moe"]]
            moe_means.setdefault(name, []).extend(vals)
        rows.append({
            "arm": arm.name, "group": arm.group, "note": arm.note, "seeds": len(rs),
            "valid_lm_loss": loss, "valid_lm_loss_se": loss_se,
            "valid_ppl": math.exp(loss), "valid_ppl_se": math.exp(loss) * loss_se,
            "params_total": rs[0]["params_total"], "params_active": rs[0]["params_active"],
            "tokens_per_s": sum(r["tokens_per_s"] for r in rs) / len(rs),
            **{f"mean_{k}": sum(v) / len(v) for k, v in moe_means.items()},
            **_final_max_load(rs),
        })
    by_name = {r["arm"]: r for r in rows}
    loss_of = {(r["arm"], r["seed"]): r["valid_lm_loss"] for r in records}
    for r in rows:
        ref = by_name.get(study.reference.get(r["group"], ""))
        if ref is None:
            continue
        r["reference"] = ref["arm"]
        if ref is r:
            r["vs_reference"] = "ref"
            continue
        # Paired over the seeds both arms ran: a seed fixes the data order (and the shared
        # parameters' init) in every arm, so the per-seed difference cancels the seed-to-seed
        # spread that dominates each arm's own SE. Unpaired when fewer than 2 seeds are shared.
        seeds = sorted(s for (a, s) in loss_of if a == r["arm"] and (ref["arm"], s) in loss_of)
        if len(seeds) >= 2:
            d, d_se = mean_se([loss_of[(r["arm"], s)] - loss_of[(ref["arm"], s)] for s in seeds])
            r["delta_loss_vs_reference"], r["delta_loss_vs_reference_se"], r["paired_seeds"] = d, d_se, len(seeds)
            r["vs_reference"] = verdict(d, d_se, 0.0, 0.0)
        else:
            r["vs_reference"] = verdict(r["valid_lm_loss"], r["valid_lm_loss_se"],
                                        ref["valid_lm_loss"], ref["valid_lm_loss_se"])
    return rows


def _final_max_load(records: list[dict], tail: float = 0.1) -> dict:
    """Max/mean load over the last ``tail`` of training (mean over steps, sparse layers and seeds).
    The run mean alone hides a rule that collapses early and balances late (expert bias does)."""
    vals = [v for r in records for c in r.get("max_load_curve", {}).values() for _, v in c[-max(1, int(len(c) * tail)):]]
    return {"final_max_load": sum(vals) / len(vals)} if vals else {}


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def markdown(study: Study, rows: list[dict], prov: dict, quick: bool) -> str:
    """``prov``: megamoe.provenance.provenance(command) (command, commit, machine, date)."""
    from megamoe.provenance import markdown_header

    lines = [f"# Study: {study.name}{' (--quick, toy size: not a result)' if quick else ''}", "",
             markdown_header(prov) + study.describe, "",
             f"Validation perplexity: mean ± standard error over seeds (exp of the mean loss; SE carried "
             "through). `Δ loss vs ref`: valid-loss difference to the group's reference arm, mean ± SE "
             "of the per-seed differences (paired: arms share each seed's data order); `vs ref`: its "
             "verdict, against the reference arm "
             f"({', '.join(f'{g}: {a}' for g, a in study.reference.items())}); better/worse only when the gap "
             "exceeds 2 SE, else tie. `dropped` and `max/mean load` (the busiest expert's routed share over "
             "the mean, before capacity; 1 is perfect balance) are means over training; `last 10%`: the "
             "max/mean load over the last tenth of the steps.", "",
             "| group | arm | seeds | total params | active params | valid ppl | Δ loss vs ref | vs ref | tokens/s "
             "| dropped | max/mean load | last 10% | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dropped = r.get("mean_dropped_fraction")
        load, final = r.get("mean_max_load"), r.get("final_max_load")
        delta = ("" if "delta_loss_vs_reference" not in r else
                 f"{r['delta_loss_vs_reference']:+.4f} ± {r['delta_loss_vs_reference_se']:.4f}")
        lines.append(
            f"| {r['group']} | {r['arm']} | {r['seeds']} | {_fmt_params(r['params_total'])} | "
            f"{_fmt_params(r['params_active'])} | {r['valid_ppl']:.2f} ± {r['valid_ppl_se']:.2f} | {delta} | "
            f"{r.get('vs_reference', '')} | {r['tokens_per_s']:.0f} | "
            f"{'' if dropped is None else f'{dropped:.3f}'} | {'' if load is None else f'{load:.2f}'} | "
            f"{'' if final is None else f'{final:.2f}'} | {r['note']} |")
    return "\n".join(lines) + "\n"


def _plot_groups(study: Study, groups: list[str], curves_of, ylabel: str, png: Path) -> None:
    """One panel per group, one line per arm: the mean over ``curves_of(arm)`` (lists of
    [step, value]) smoothed over 10 % of the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for ax, g in zip(axes[0], groups):
        for arm in (a for a in study.arms if a.group == g):
            curves = curves_of(arm)
            if not curves:
                continue
            n = min(len(c) for c in curves)
            steps = [c[0] for c in curves[0][:n]]
            mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(n)]
            w = max(1, n // 10)
            smooth = [sum(mean[max(0, i - w + 1):i + 1]) / len(mean[max(0, i - w + 1):i + 1]) for i in range(n)]
            ax.plot(steps, smooth, label=arm.name, lw=1)
        ax.set_title(f"{study.name} {g}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{ylabel} (smoothed)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_curves(study: Study, records: list[dict], png: Path) -> None:
    """Mean train lm-loss curve per arm, one panel per group."""
    _plot_groups(study, list(dict.fromkeys(a.group for a in study.arms)),
                 lambda arm: [r["train_curve"] for r in records if r["arm"] == arm.name], "train lm loss", png)


def plot_load(study: Study, records: list[dict], png: Path) -> None:
    """Max/mean expert load over training (mean over seeds and MoE layers), one panel per group
    that has MoE arms: 1 is perfect balance, E is every token on one expert."""
    groups = [g for g in dict.fromkeys(a.group for a in study.arms)
              if any(r.get("max_load_curve") for r in records if r["group"] == g)]
    if groups:
        _plot_groups(study, groups, lambda arm: [c for r in records if r["arm"] == arm.name
                                                 for c in r.get("max_load_curve", {}).values()],
                     "max / mean expert load", png)


def report(study: Study, out: Path, command: str, quick: bool) -> list[dict]:
    from megamoe.provenance import provenance

    records = load_records(out)
    rows = summarise(study, records)
    prov = provenance(command)
    atomic_write_text(out / "summary.json", json.dumps({"study": study.name, **prov, "quick": quick,
                                                         "rows": rows}, indent=1) + "\n")
    atomic_write_text(out / "summary.md", markdown(study, rows, prov, quick))
    if records:
        plot_curves(study, records, out / "loss_curves.png")
        plot_load(study, records, out / "max_load.png")
    return rows


def main(study: Study, argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=study.describe)
    p.add_argument("--quick", action="store_true", help="toy size, the whole study in a few minutes (tests)")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds per arm (default {study.seeds}; --quick: 2)")
    p.add_argument("--only", default="", help="comma-separated arm names to run (default: all)")
    p.add_argument("--out", default=None, help=f"result dir (default results/experiments/{study.name}"
                                               "[-quick])")
    p.add_argument("--report-only", action="store_true", help="rebuild the table/plot from cached results")
    p.add_argument("--list", action="store_true", help="list the arms and exit")
    args = p.parse_args(argv)
    if args.list:
        for a in study.arms:
            print(f"{a.group:8s} {a.name:24s} {' '.join(a.overrides)}")
        return 0
    out = Path(args.out or ROOT / "results" / "experiments" / (study.name + ("-quick" if args.quick else "")))
    seeds = args.seeds or (2 if args.quick else study.seeds)
    only = [s for s in args.only.split(",") if s] or None
    unknown = sorted(set(only or []) - {a.name for a in study.arms})
    if unknown:
        from megamoe.errors import UserError

        raise UserError(f"--only: unknown arm(s) {unknown}; see --list")
    # the command that produces these results (a --report-only rebuild records the study command)
    args_shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + args_shown)
    if not args.report_only:
        run_study(study, out, args.quick, seeds, only)
    report(study, out, command, args.quick)
    print0((out / "summary.md").read_text())
    print0(f"wrote {out}/summary.md, summary.json, loss_curves.png, max_load.png")
    return 0
