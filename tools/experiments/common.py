"""Shared machinery of the pretraining studies (routing.py, mpoe.py, balance.py): an LR sweep per
method family, resumable (arm, seed) runs tied to the code that made them, paired statistics
with Holm-corrected verdicts (megamoe.stats), a markdown table, JSON and PNGs.

Design:
- One process runs a whole study; each (arm, seed) is one in-process ``Trainer`` run (a world of
  one, gloo) so the framework is imported once and the process groups are built once
  (``megamoe.parallel.init_parallel`` reuses an unchanged layout's groups; rebuilding them per
  run leaked ~50 gloo threads a run).
- Splits: train / valid / test = :data:`SPLIT`. The LR sweep selects on valid; every number
  the tables compare is the test loss (:func:`evaluate_test`).
- LR sweep: an arm with a ``family`` trains at that family's LR, chosen as the lowest final
  valid loss of ``Study.lr_grid`` on the family's sweep arm (``Study.lr_sweep``) at one seed of
  its own (:data:`SWEEP_SEED`, never a reported seed). Sweep runs are cached like arms, in
  ``<out>/lr_sweep/<family>/lr<value>.json``; the chosen LR is in each arm's overrides, so a
  sweep that changes its pick makes its family's results stale.
- Resumable: the result of each (arm, seed) is written atomically to
  ``<out>/<arm>/seed<k>.json`` as soon as it finishes. Killing a study loses at most the run in
  progress.
- Tied to code: each result records the git commit, the repository files of every Python module
  loaded when it finished (megamoe/ and tools/: the library, the study script, this file) with a
  hash of their contents (``code_sha``), and a hash of its declared overrides (``config_sha``:
  base + arm + LR + quick + seed; resolved defaults are code, so covered by ``code_sha``). A
  result is stale when either differs from today's (:func:`stale_reason`): tables mark it, and
  ``--rerun-stale`` retrains it; otherwise a finished pair is never rerun. Only loaded files
  count, so the fine-tuning package or a tool no run imports does not invalidate pretraining
  results. Docstrings, comments and layout are not hashed (:func:`_code`), so a documentation
  commit leaves results current. Trap: each file is read once per process, when the first
  result that loaded it is cached; a module the study imported earlier runs the code of its
  import, so editing it while a study runs can make the hash newer than the code that ran.
- Seeds vary both the model init (``train.seed``) and the data order (``data.seed``).
- Fixed token budget: every arm of a study trains the same number of steps at the same batch
  size and sequence length (an arm's own ``train.train_steps`` says otherwise and why).
- Statistics (megamoe.stats): per-seed paired differences of the test loss to the group's
  reference arm, their 95 % t-interval, Holm's correction over all of a study's comparisons,
  and the verdict words from :func:`megamoe.stats.verdicts` (TOST margin ``Study.margin``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import gc
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megamoe.utils import atomic_path, atomic_write_text, claim, print0, progress  # noqa: E402

# The studies' corpus split: train, valid (LR selection), test (every reported number). Not the
# demo's 98,2,0, which has no test split. Trap: the corpus's last documents are short, so 2 %
# of the documents held only 216 sequences of 128 tokens; 5 % holds 547 (70k tokens), enough
# for one pass of 32 batches of 16 without repeating a sequence.
SPLIT = "90,5,5"
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


SWEEP_SEED = 99  # the LR sweep's seed: train.seed=1099, data.seed=2099 (reported seeds are 0..n-1)


@dataclass
class Arm:
    name: str
    overrides: list[str]
    group: str = ""  # table section (e.g. "E=16")
    note: str = ""  # shown in the table (e.g. "analysis only")
    prepare: object = None  # callable(arm, seed, run_dir, overrides) -> extra overrides, run before training
    family: str = ""  # its LR comes from this family's sweep (Study.lr_sweep); "" = the base LR
    seeds: int = 0  # seeds of this arm (0 = the study's; fewer for arms outside the headline)


@dataclass
class Study:
    name: str
    base_overrides: list[str]  # the full-size model and token budget
    quick_overrides: list[str]  # toy size for --quick (appended after base)
    arms: list[Arm]
    reference: dict  # {group: arm} each group's rows are compared with
    seeds: int = 5
    test_batches: int = 32  # micro-batches of the test split per run (32 x 16 = 512 of its 547 sequences)
    describe: str = ""
    lr_sweep: dict = field(default_factory=dict)  # {family: name of the arm the family's LR is swept on}
    lr_grid: tuple = (1e-3, 2e-3, 4e-3)  # peak LRs of the sweep (min LR = peak / 10)
    margin: float = 0.01  # TOST equivalence margin on the test loss, nats
    figures: object = None  # callable(study, rows, out) -> markdown: the study's own plots and tables


# ---- code and config fingerprints --------------------------------------------------------------

def loaded_code() -> list[str]:
    """Repository paths of the Python modules loaded in this process from megamoe/ and tools/."""
    out = set()
    for m in list(sys.modules.values()):
        f = getattr(m, "__file__", None)
        if not f:
            continue
        rel = os.path.relpath(os.path.realpath(f), ROOT)
        if rel.endswith(".py") and rel.split(os.sep)[0] in ("megamoe", "tools"):
            out.add(rel)
    return sorted(out)


def code_sha(files: list[str]) -> str:
    """Hash of the paths and today's code of ``files`` (a missing file hashes as missing)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode() + b"\0" + _code(ROOT / f) + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _code(path: Path) -> bytes:
    """The file's syntax tree without docstrings (comments and layout are not in it): editing a
    docstring, a comment or the line breaks leaves every result current; any other edit, a help
    string included, makes the results that loaded the file stale. Cached per process (tests
    that rewrite a file clear it): a --report-only reads each file once, not once per result."""
    if not path.is_file():
        return b"<missing>"
    src = path.read_bytes()
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return src
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree).encode()


def config_sha(overrides: list[str]) -> str:
    return hashlib.sha256(json.dumps(_relative(overrides)).encode()).hexdigest()[:16]


def _relative(obj):
    """Repository-relative paths: committed results name no machine's directories."""
    return json.loads(json.dumps(obj).replace(f"{ROOT}/", ""))


def declared(study: Study, arm: Arm, seed: int, quick: bool, lr: float | None) -> list[str]:
    """The overrides that define an (arm, seed): what ``config_sha`` hashes. Run directories
    and an arm's ``prepare`` outputs (paths derived from these) are not part of it."""
    lr_over = [] if lr is None else [f"train.lr={lr:g}", f"train.min_lr={lr / 10:g}"]
    # quick last: the toy size wins over an arm's own step count
    return (list(study.base_overrides) + list(arm.overrides) + lr_over + (list(study.quick_overrides) if quick else [])
            + [f"train.seed={1000 + seed}", f"data.seed={2000 + seed}"])


def fingerprint(overrides: list[str]) -> dict:
    from megamoe.provenance import commit

    files = loaded_code()
    if not any(f.startswith("megamoe" + os.sep) for f in files):  # an installed copy ran, not this tree's
        raise RuntimeError(f"megamoe was not imported from {ROOT}: the result could not be tied to its code")
    return {"commit": commit(), "code_files": files, "code_sha": code_sha(files), "config_sha": config_sha(overrides)}


def stale_reason(rec: dict, overrides: list[str] | None) -> str:
    """'' when ``rec`` was made by today's code and the study's current ``overrides`` for it,
    else why not (``overrides`` None: the study cannot say today, e.g. its LR sweep is missing)."""
    if "code_sha" not in rec:
        return "no fingerprint"
    if code_sha(rec["code_files"]) != rec["code_sha"]:
        return "code changed"
    if overrides is None or config_sha(overrides) != rec["config_sha"]:
        return "config changed"
    return ""


# ---- runs ---------------------------------------------------------------------------------------

def run_one(study: Study, arm: Arm, seed: int, run_dir: Path, overrides: list[str], quick: bool) -> dict:
    """Train one (arm, seed) in this process (``overrides``: its :func:`declared` list) and return
    its result record."""
    import torch

    from megamoe.run_config import load_run_config
    from megamoe.train.trainer import Trainer

    defined = list(overrides)
    if arm.prepare is not None:
        overrides = overrides + arm.prepare(arm, seed, run_dir, overrides)
    overrides = overrides + [
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
    curve = lambda k: [[h["step"], h[k]] for h in train if k in h]  # noqa: E731
    rec = {
        "study": study.name, "arm": arm.name, "group": arm.group, "seed": seed, "quick": quick,
        "lr": run.train.lr,
        "valid_lm_loss": result["valid"]["lm_loss"], "valid_ppl": result["valid"]["ppl"],
        "test_lm_loss": test["lm_loss"], "test_ppl": test["ppl"], "test_tokens": test["tokens"],
        "params_total": result["params"]["total"], "params_active": result["params"]["active"],
        "tokens_per_s": sum(h["tokens_per_s"] for h in steady) / len(steady),
        "train_curve": [[h["step"], h["lm_loss"]] for h in train],
        "valid_curve": [[h["step"], h["lm_loss"]] for h in valid],
        "moe": {k: sum(h[k] for h in train if k in h) / max(1, sum(1 for h in train if k in h)) for k in moe_keys},
        "max_load_curve": {k: curve(k) for k in moe_keys if k.endswith("max_load")},
        # hash layers log entropy 0: only learned routers' curves are kept
        "entropy_curve": {k: curve(k) for k in moe_keys if k.endswith("router_entropy") and any(v for _, v in curve(k))},
        "wall_s": wall, "overrides": overrides,
        "checkpoint": result["checkpoint"],
        **fingerprint(defined),
    }
    del trainer
    gc.collect()
    torch.manual_seed(0)
    return rec


def _cached(path: Path, overrides: list[str] | None, rerun_stale: bool) -> dict | None:
    """The cached record at ``path``, or None when there is none or it is stale and to be rerun."""
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    return None if rerun_stale and stale_reason(rec, overrides) else rec


def _save(path: Path, rec: dict) -> dict:
    rec = _relative(rec)
    atomic_write_text(path, json.dumps(rec, indent=1) + "\n")
    return rec


def _sweep_arm(study: Study, family: str) -> Arm:
    return next(a for a in study.arms if a.name == study.lr_sweep[family])


def sweep_records(study: Study, out: Path, family: str) -> dict:
    """{lr: cached sweep record} of a family (missing LRs absent)."""
    d = out / "lr_sweep" / family
    return {lr: json.loads((d / f"lr{lr:g}.json").read_text()) for lr in study.lr_grid
            if (d / f"lr{lr:g}.json").is_file()}


def chosen_lr(study: Study, out: Path, family: str) -> float | None:
    """The family's LR: the grid value of lowest final valid loss, None until the sweep is complete."""
    recs = sweep_records(study, out, family)
    if len(recs) < len(study.lr_grid):
        return None
    loss = {lr: r["valid_lm_loss"] for lr, r in recs.items()}
    return min(loss, key=lambda lr: loss[lr] if math.isfinite(loss[lr]) else math.inf)  # a diverged LR loses


def run_sweep(study: Study, out: Path, quick: bool, family: str, rerun_stale: bool) -> float:
    arm = _sweep_arm(study, family)
    for wait in (False, True):  # first the LRs no other process holds, then wait for the rest
        for lr in study.lr_grid:
            path = out / "lr_sweep" / family / f"lr{lr:g}.json"
            overrides = declared(study, arm, SWEEP_SEED, quick, lr)
            if _cached(path, overrides, rerun_stale) is None:
                with claim(path, wait, todo=lambda: _cached(path, overrides, rerun_stale) is None) as mine:
                    if mine:
                        print0(f"{study.name}: LR sweep of family {family!r} on {arm.name}: lr={lr:g}")
                        _save(path, dict(run_one(study, arm, SWEEP_SEED, path.with_suffix(".run"), overrides, quick),
                                         family=family, sweep=True))
    return chosen_lr(study, out, family)


def arm_overrides(study: Study, arm: Arm, seed: int, quick: bool, out: Path) -> list[str] | None:
    """Today's :func:`declared` overrides of (arm, seed); None when its family's sweep is incomplete."""
    if not arm.family:
        return declared(study, arm, seed, quick, None)
    lr = chosen_lr(study, out, arm.family)
    return None if lr is None else declared(study, arm, seed, quick, lr)


def run_study(study: Study, out: Path, quick: bool, seeds: int, only: list[str] | None,
              rerun_stale: bool = False) -> list[dict]:
    arms = [a for a in study.arms if not only or a.name in only]
    for family in dict.fromkeys(a.family for a in arms if a.family):
        run_sweep(study, out, quick, family, rerun_stale)
    records = []
    todo = [(a, s) for a in arms for s in range(min(seeds, a.seeds or seeds))]
    bar = progress(todo, desc=study.name, unit="run")
    for arm, seed in bar:
        path = out / arm.name / f"seed{seed}.json"
        bar.set_postfix(arm=arm.name, seed=seed)
        overrides = arm_overrides(study, arm, seed, quick, out)
        rec = _cached(path, overrides, rerun_stale)
        if rec is None:
            with claim(path, todo=lambda: _cached(path, overrides, rerun_stale) is None) as mine:
                if mine:
                    rec = _save(path, run_one(study, arm, seed, path.with_suffix(".run"), overrides, quick))
                else:  # done meanwhile, or running in another process (then not in this one's tables)
                    rec = _cached(path, overrides, rerun_stale)
        if rec is not None:
            records.append(rec)
    return records


def load_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/seed*.json"))]


# ---- statistics and tables ----------------------------------------------------------------------

METRIC = "test_lm_loss"  # what the tables compare; valid is for selection (the LR sweep)


def summarise(study: Study, records: list[dict], out: Path | None = None) -> list[dict]:
    """One row per arm: test loss/ppl with its 95 % interval, valid ppl, params, speed, MoE
    scalars, how many of its results are stale; and against its group's reference arm, the
    paired test-loss difference, its interval, Holm-adjusted p-values and the verdict word.
    ``out`` (the study's result dir) resolves swept LRs for the staleness check; without it
    every swept arm's result counts as stale."""
    from megamoe.stats import paired_interval, verdicts

    by_arm: dict[str, list[dict]] = {}
    for r in records:
        by_arm.setdefault(r["arm"], []).append(r)
    rows = []
    for arm in study.arms:
        rs = sorted(by_arm.get(arm.name, []), key=lambda r: r["seed"])
        if not rs:
            continue
        losses = [r[METRIC] for r in rs if METRIC in r]
        iv = paired_interval(losses) if losses else None
        moe_means: dict[str, list[float]] = {}
        for k in sorted({k for r in rs for k in r["moe"]}):
            moe_means.setdefault(k.split("/")[-1], []).extend(r["moe"][k] for r in rs if k in r["moe"])
        stale = [r["seed"] for r in rs if stale_reason(
            r, arm_overrides(study, arm, r["seed"], r.get("quick", False), out) if out else None)]
        rows.append({
            "arm": arm.name, "group": arm.group, "note": arm.note, "seeds": len(rs), "stale_seeds": stale,
            "lr": rs[0].get("lr"),
            "valid_lm_loss": sum(r["valid_lm_loss"] for r in rs) / len(rs),
            **({} if iv is None else {"test_lm_loss": iv.mean, "test_lm_loss_lo": iv.lo, "test_lm_loss_hi": iv.hi,
                                      "test_ppl": math.exp(iv.mean)}),
            "params_total": rs[0]["params_total"], "params_active": rs[0]["params_active"],
            "tokens_per_s": sum(r["tokens_per_s"] for r in rs) / len(rs),
            "wall_h": sum(r.get("wall_s", 0.0) for r in rs) / 3600,
            **{f"mean_{k}": sum(v) / len(v) for k, v in moe_means.items()},
            **_final(rs, "max_load_curve", "final_max_load"), **_final(rs, "entropy_curve", "final_router_entropy"),
        })
    by_name = {r["arm"]: r for r in rows}
    loss_of = {(r["arm"], r["seed"]): r[METRIC] for r in records if METRIC in r}
    diffs = {}
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
        # spread that dominates each arm's own interval.
        seeds = sorted(s for (a, s) in loss_of if a == r["arm"] and (ref["arm"], s) in loss_of)
        if seeds:
            diffs[r["arm"]] = [loss_of[(r["arm"], s)] - loss_of[(ref["arm"], s)] for s in seeds]
        else:  # nothing to test (e.g. only results from before the test split): not in Holm's family
            r.update(vs_reference="not resolved", paired_seeds=0)
    for name, v in verdicts(diffs, margin=study.margin).items():
        by_name[name].update({"vs_reference": v.word, "paired_seeds": v.n, "delta_test_loss": v.mean,
                              "delta_lo": v.lo, "delta_hi": v.hi, "p_holm": v.p_adj, "p_tost_holm": v.p_tost_adj})
    return rows


def _final(records: list[dict], key: str, name: str, tail: float = 0.1) -> dict:
    """Mean of a per-layer curve over the last ``tail`` of training (over steps, layers and seeds).
    The run mean alone hides a rule that collapses early and balances late (expert bias does)."""
    vals = [v for r in records for c in r.get(key, {}).values() for _, v in c[-max(1, int(len(c) * tail)):]]
    return {name: sum(vals) / len(vals)} if vals else {}


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def _f(v, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def markdown(study: Study, rows: list[dict], prov: dict, quick: bool, sweeps: dict) -> str:
    """``prov``: megamoe.provenance.provenance(command) (command, commit, machine, date);
    ``sweeps``: {family: {"arm", "lr": {lr: valid loss}, "chosen"}}."""
    from megamoe.provenance import markdown_header

    m = sum(1 for r in rows if "p_holm" in r)
    lines = [f"# Study: {study.name}{' (--quick, toy size: not a result)' if quick else ''}", "",
             markdown_header(prov) + study.describe, "",
             "`test ppl`: exp of the mean test loss over seeds, with the 95 % t-interval of that mean "
             "in brackets. `Δ test loss`: the test-loss difference to the group's reference arm "
             f"({', '.join(f'{g}: {a}' for g, a in study.reference.items())}), mean of the per-seed "
             "differences (paired: arms share each seed's data order and init) and its 95 % t-interval. "
             f"`p (Holm)`: the paired t-test's p-value, Holm-adjusted over this table's {m} comparisons. "
             "`vs ref` (megamoe.stats.verdicts): better/worse only when that p < 0.05; tie only when "
             f"the Holm-adjusted equivalence test (TOST) at ±{study.margin} nats passes; else not resolved. "
             "`valid ppl` is what the LR sweep selects on; no comparison reads it. `dropped` and "
             "`max/mean load` (the busiest expert's routed share over the mean, before capacity; 1 is "
             "perfect balance) are means over training; `last 10%`: over the last tenth of the steps; "
             "`entropy`: the learned router's mean entropy over the last tenth (ln E is uniform). `code`: "
             "`stale k` when k of the arm's results were made by other code or config than today's "
             "(rerun them with `--rerun-stale`).", "",
             "| group | arm | seeds | total params | active params | LR | valid ppl | test ppl [95% CI] | "
             "Δ test loss [95% CI] | p (Holm) | vs ref | tokens/s | dropped | max/mean load | last 10% | "
             "entropy | code | note |",
             "|" + "---|" * 18]
    for r in rows:
        ci = (f"{r['test_ppl']:.2f} [{math.exp(r['test_lm_loss_lo']):.2f}, {math.exp(r['test_lm_loss_hi']):.2f}]"
              if "test_ppl" in r and not math.isnan(r["test_lm_loss_lo"]) else _f(r.get("test_ppl"), ".2f"))
        delta = ("" if "delta_test_loss" not in r else
                 f"{r['delta_test_loss']:+.4f} [{_f(r['delta_lo'], '+.4f')}, {_f(r['delta_hi'], '+.4f')}]")
        lines.append(
            f"| {r['group']} | {r['arm']} | {r['seeds']} | {_fmt_params(r['params_total'])} | "
            f"{_fmt_params(r['params_active'])} | {_f(r['lr'], 'g')} | {math.exp(r['valid_lm_loss']):.2f} | {ci} | "
            f"{delta} | {_f(r.get('p_holm'), '.3g')} | {r.get('vs_reference', '')} | {r['tokens_per_s']:.0f} | "
            f"{_f(r.get('mean_dropped_fraction'), '.3f')} | {_f(r.get('mean_max_load'), '.2f')} | "
            f"{_f(r.get('final_max_load'), '.2f')} | {_f(r.get('final_router_entropy'), '.2f')} | "
            f"{'stale ' + str(len(r['stale_seeds'])) if r['stale_seeds'] else 'current'} | {r['note']} |")
    lines += ["", f"Compute: {sum(r['wall_h'] for r in rows):.1f} CPU-hours in the cached runs of this table "
              "(the LR sweep's not included)."]
    if sweeps:
        lines += ["", f"LR sweep (seed {SWEEP_SEED}, valid loss; the lowest is each family's LR):", "",
                  "| family | swept on | " + " | ".join(f"lr {lr:g}" for lr in study.lr_grid) + " | chosen | code |",
                  "|" + "---|" * (4 + len(study.lr_grid))]
        for fam, sw in sweeps.items():
            edge = " (grid edge: widen the grid)" if sw["chosen"] in (min(study.lr_grid), max(study.lr_grid)) else ""
            lines.append(f"| {fam} | {sw['arm']} | " + " | ".join(_f(sw["lr"].get(lr), ".4f") for lr in study.lr_grid)
                         + f" | {_f(sw['chosen'], 'g')}{edge} | {'stale ' + str(len(sw['stale'])) if sw['stale'] else 'current'} |")
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
    _save_png(fig, png)


def _save_png(fig, png: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_test_ppl(png: Path, xlabel: str, draw, dense_ppl: float | None = None, log_base: int = 10) -> None:
    """Test perplexity against a log-scaled x: ``draw(ax)`` plots the methods; a dashed line
    marks the dense model (the studies' figures: routing's E-ladder, mpoe's parameter curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    draw(ax)
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="k", ls="--", lw=1, label="dense")
    ax.set_xscale("log", base=log_base)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save_png(fig, png)


def plot_curves(study: Study, records: list[dict], png: Path) -> None:
    """Mean train lm-loss curve per arm, one panel per group."""
    _plot_groups(study, list(dict.fromkeys(a.group for a in study.arms)),
                 lambda arm: [r["train_curve"] for r in records if r["arm"] == arm.name], "train lm loss", png)


def plot_moe_curve(study: Study, records: list[dict], key: str, ylabel: str, png: Path) -> None:
    """A per-layer MoE curve over training (``key``: max_load_curve, entropy_curve), mean over
    seeds and MoE layers, one panel per group that has such curves."""
    groups = [g for g in dict.fromkeys(a.group for a in study.arms)
              if any(r.get(key) for r in records if r["group"] == g)]
    if groups:
        _plot_groups(study, groups, lambda arm: [c for r in records if r["arm"] == arm.name
                                                 for c in r.get(key, {}).values()], ylabel, png)


def report(study: Study, out: Path, command: str, quick: bool) -> list[dict]:
    from megamoe.provenance import provenance

    records = load_records(out)
    rows = summarise(study, records, out)
    sweeps = {}
    for fam, arm in study.lr_sweep.items():
        recs = sweep_records(study, out, fam)
        sweeps[fam] = {"arm": arm, "lr": {lr: r["valid_lm_loss"] for lr, r in recs.items()},
                       "chosen": chosen_lr(study, out, fam),
                       "stale": [lr for lr, r in recs.items() if stale_reason(r, declared(
                           study, _sweep_arm(study, fam), SWEEP_SEED, r.get("quick", False), lr))]}
    prov = provenance(command)
    atomic_write_text(out / "summary.json", json.dumps(
        {"study": study.name, **prov, "quick": quick, "margin": study.margin, "lr_sweep": sweeps, "rows": rows},
        indent=1) + "\n")
    # the study's own figures (E-ladder, MPO curve) and their tables go below the main table
    extra = study.figures(study, rows, out) if study.figures is not None and rows else ""
    atomic_write_text(out / "summary.md", markdown(study, rows, prov, quick, sweeps) + extra)
    if records:
        plot_curves(study, records, out / "loss_curves.png")
        # 1 is perfect balance, E is every token on one expert
        plot_moe_curve(study, records, "max_load_curve", "max / mean expert load", out / "max_load.png")
        # ln E is a uniform router; a router that learns falls below it
        plot_moe_curve(study, records, "entropy_curve", "router entropy (nats)", out / "router_entropy.png")
    return rows


def main(study: Study, argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=study.describe)
    p.add_argument("--quick", action="store_true", help="toy size, the whole study in a few minutes (tests)")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds per arm (default {study.seeds}; --quick: 2); an arm with fewer seeds of its "
                   "own (outside the headline groups) keeps them")
    p.add_argument("--only", default="", help="comma-separated arm names to run (default: all)")
    p.add_argument("--out", default=None, help=f"result dir (default results/experiments/{study.name}"
                                               "[-quick])")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the tables and plots from cached results (stale ones are marked)")
    p.add_argument("--rerun-stale", action="store_true",
                   help="retrain cached results made by other code or config than today's")
    p.add_argument("--list", action="store_true", help="list the arms and exit")
    args = p.parse_args(argv)
    if args.list:
        for a in study.arms:
            print(f"{a.group:8s} {a.name:24s} {' '.join(a.overrides)}")
        return 0
    if args.quick:  # the grid's ends: the sweep's code path at two thirds of its cost
        study = dataclasses.replace(study, lr_grid=(study.lr_grid[0], study.lr_grid[-1]))
    out = Path(args.out or ROOT / "results" / "experiments" / (study.name + ("-quick" if args.quick else "")))
    seeds = args.seeds or (2 if args.quick else study.seeds)
    only = [s for s in args.only.split(",") if s] or None
    unknown = sorted(set(only or []) - {a.name for a in study.arms})
    if unknown:
        from megamoe.errors import UserError

        raise UserError(f"--only: unknown arm(s) {unknown}; see --list")
    # the command that produces these results (a --report-only rebuild records the study command)
    args_shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--report-only", "--rerun-stale")]
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + args_shown)
    if not args.report_only:
        run_study(study, out, args.quick, seeds, only, args.rerun_stale)
    report(study, out, command, args.quick)
    print0((out / "summary.md").read_text())
    print0(f"wrote {out}/summary.md, summary.json and plots")
    return 0
