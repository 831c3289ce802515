#!/usr/bin/env python
"""Multi-task fine-tuning of a megamoe model: the adapter suite, few-shot transfer, or one run that saves its adapters.

    python tools/fetch_tasks.py                                   # once: data/tasks/*.jsonl
    bash launch/ft_base.sh                                        # once: the base, runs/ft_base/hf
    python tools/finetune.py                                      # the suite -> results/finetune.{json,md,png}
    python tools/finetune.py --transfer bbc_topic,spam            # few-shot transfer -> results/finetune_transfer.*
    python tools/finetune.py --base hf/demo --arms lora --sizes 300 --seeds 0 --save out/lora   # one run, saved
    deepspeed --num_gpus 2 tools/finetune.py --deepspeed --base hf/demo --arms poly --sizes 300 --seeds 0 --save out/poly
    python tools/finetune.py --quick ...                          # seconds to minutes: fewer arms, steps, examples

``--base``: a native checkpoint (training save_dir, one global_stepN dir, or a convert_from_hf
output) or an HF export directory (stock Llama / Mixtral or the ``megamoe`` architecture).
Fine-tuning runs on the HF model (megamoe/finetune/base_model.py). The base is frozen; every
arm trains its adapters plus one shared classification head (``head`` = that head alone). The
results record the base's weights sha256 and, for the committed base, the command that made it.

Choices on validation, test read once (issue 29): every arm without a fixed ``lr=`` first runs
each lr of ``--lr-grid`` at the first seed and size, evaluated on the validation split only
(megamoe/finetune/data.py carves it from train); the best is recorded and used for every final
run. Only final runs evaluate the test split, and the tables report it. The papers' own
settings are fixed arms (``PAPER``: rank 16, 8 skills, every projection, lr 1e-3).

Suite: every arm x training size (examples per task) x seed; each run is cached as
``CACHE/<settings hash>/<final|select>__<arm>__lr<lr>__n<size>__s<seed>.json`` the moment it
finishes, so an interrupted suite resumes where it stopped and the tables are rebuilt from the
cache. Several processes may run the same command on one cache (one per core, ``OMP_NUM_THREADS=1``):
each run is claimed with an advisory lock (``<run>.lock``, released when its process exits, even
killed), a claimed run is skipped by the others, and each worker's own report is incomplete; rebuild
the tables with ``--report`` once all have finished. Results: per arm and size, test accuracy (mean over seeds, Student-t 95% interval over
seeds); the papers' claims as paired per-seed differences judged by megamoe.stats (Holm over
the table's claims, equivalence at +-MARGIN) with the verdict word and the claim's outcome from
code; the routing check (entropy must fall) and the dead-arm check (adapters must move).

``--transfer A,B``: the papers' main claim. ``<arm>+skills`` learns adapters on the other tasks
(``--prior-size`` examples each, ``--prior-steps`` steps, at ``--lr``; cached as a .pt per arm
and seed), then adapts to each held-out task alone with k = ``--sizes`` examples: the held-out
task's routing row (and C-Poly's private skill) start untrained, as mttl's
``SkillWrapper.resize_module_logits`` gives new tasks fresh U(-1e-3, 1e-3) logits
(mttl/models/poly.py). The baselines (``lora:rank=16``, ``head``, ``poly``) train on the
held-out task alone.

``--save DIR`` (one arm, one size, one seed): the adapters alone, LoRA / Poly in PEFT format
(``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<HF export>), DIR)``), the
others as safetensors + megamoe_adapter.json (megamoe.finetune.inject.load_adapters), and the
head + task list in extra.safetensors / megamoe_finetune.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamoe.errors import UserError, cli_main  # noqa: E402

TASKS = "wiki_topic,wiki_stem,spam,brown_genre,brown_fiction,bbc_topic,tweet_sentiment,tweet_polarity"
HELD_OUT = "bbc_topic,spam"  # few-shot transfer: tasks with no sibling task among the others
# The papers' own settings (official Poly / TensorPoly runs, shared/design/official-code.md): rank 16,
# 8 skills, every projection, adapter lr 1e-3 (routing logits 0.1); TensorPoly's "SOTA" configs route
# by sigmoid in training too. Departures (this base, 300 steps, sequences of 32) in docs/finetuning.md.
PAPER = "rank=16/num_skills=8/target_modules=all/lr=0.001"
QUICK_ARMS = "head,lora:rank=16,poly,cpoly,tensorpoly1,mta,mta_one"
TRANSFER_ARMS = "poly+skills,cpoly+skills,poly,lora:rank=16,head"
QUICK_TRANSFER_ARMS = "poly+skills,lora:rank=16,head"
FT_BASE_COMMAND = "bash launch/ft_base.sh  (configs/ft_base.yaml; docs/finetuning.md#the-base)"
RECIPE = 3  # 3: validation split, lr per arm, test read by final runs only; 2: --pool/--schedule
MARGIN = 0.01  # equivalence margin of a "tie", task-average accuracy
POOL_DESC = {"mean": "mean of the real tokens' final states", "last": "last real token's final state"}


def equal_size_arms(T: int, cfg) -> tuple[str, str]:
    """Poly and a private LoRA per task with C-Poly's adapter parameters: C-Poly holds S shared +
    T private rank-r modules per projection, so Poly gets S + T skills and the private LoRA rank
    r (S + T) / T (rounded down: the counts are shown beside each row). Only routing logits differ."""
    S, r = cfg.num_skills, cfg.rank
    return f"poly:num_skills={S + T}", f"cpoly:num_skills=0/rank={r * (S + T) // T}"


def default_arms(T: int, cfg) -> str:
    """The same-task suite: the recipe arms (lr chosen on validation), C-Poly against Poly and a
    private LoRA per task at equal adapter parameters, and the papers' own settings."""
    return ",".join(["head", "lora:rank=16", "poly", "cpoly", "tensorpoly1", "tensorpoly2", "mta", "mta_one",
                     *equal_size_arms(T, cfg), f"poly:{PAPER}", f"cpoly:{PAPER}",
                     f"tensorpoly1:{PAPER}/relaxed_bernoulli=false", f"tensorpoly2:{PAPER}/relaxed_bernoulli=false"])


def label(arm: str) -> str:
    method, _, rest = arm.partition(":")
    if rest.startswith(PAPER):
        return f"{arm.split(':')[0]}, paper settings (r16, S8, all projections, lr 1e-3)"
    if arm.startswith("poly:num_skills="):
        return f"Poly, {rest.split('=')[1]} skills (C-Poly's size)"
    if arm.startswith("cpoly:num_skills=0"):
        return "private LoRA per task" + (f" r={arm.rsplit('=', 1)[1]} (C-Poly's size)" if "/rank=" in arm else "")
    return {"head": "head only", "lora:rank=16": "shared LoRA r=16 (Poly's size)", "poly": "Poly", "cpoly": "C-Poly",
            "tensorpoly1": "TensorPoly-I", "tensorpoly2": "TensorPoly-II", "mta": "MTA two-stage",
            "mta_one": "MTA one-stage", "poly+skills": "Poly, skills from the other tasks",
            "cpoly+skills": "C-Poly, skills from the other tasks"}.get(arm, arm)


def claims(T: int, cfg) -> list:
    """(label, arm a, arm b or a list averaged, kind): "better" claims a beats b; "tie" a ~ b."""
    poly_eq, private_eq = equal_size_arms(T, cfg)
    return [("modular > shared LoRA (mean of Poly, C-Poly, TensorPoly-I/II, MTA)",
             ["poly", "cpoly", "tensorpoly1", "tensorpoly2", "mta"], "lora:rank=16", "better"),
            ("C-Poly > Poly (paper settings)", f"cpoly:{PAPER}", f"poly:{PAPER}", "better"),
            ("C-Poly > Poly at equal adapter parameters", "cpoly", poly_eq, "better"),
            ("C-Poly > private LoRA at equal adapter parameters", "cpoly", private_eq, "better")] + CLAIMS


CLAIMS = [("TensorPoly-I ~ Poly with fewer parameters (paper settings)",
           f"tensorpoly1:{PAPER}/relaxed_bernoulli=false", f"poly:{PAPER}", "tie"),
          ("MTA two-stage > one-stage", "mta", "mta_one", "better"),
          ("validity: shared LoRA r=16 > head only", "lora:rank=16", "head", "better")]
TRANSFER_CLAIMS = [("Poly skills transfer: > LoRA on the task alone", "poly+skills", "lora:rank=16", "better"),
                   ("C-Poly skills transfer: > LoRA on the task alone", "cpoly+skills", "lora:rank=16", "better"),
                   ("Poly skills transfer: > Poly on the task alone", "poly+skills", "poly", "better"),
                   ("validity: Poly skills > head only", "poly+skills", "head", "better")]


def outcome(kind: str, word: str) -> str:
    """A claim's outcome from megamoe.stats' verdict word (a on b, lower error is better):
    "reproduced" only where the claimed direction is significant ("better") or, for an
    equivalence claim, the margin test passes ("tie"); "not resolved" stays "not resolved"."""
    if word == "not resolved":
        return "not resolved"
    if kind == "tie":
        return "reproduced" if word == "tie" else "not reproduced"
    return {"better": "reproduced", "worse": "contradicted", "tie": "not reproduced (tie within the margin)"}[word]


def split_lr(arm: str) -> tuple[str, float | None]:
    """``"poly:rank=16/lr=0.001"`` -> ("poly:rank=16", 0.001); an arm without ``lr=`` has its lr
    chosen on validation. ``+skills`` (transfer) stays on the spec."""
    head, sep, rest = arm.partition(":")
    items = [x for x in rest.split("/") if x]
    lrs = [x for x in items if x.startswith("lr=")]
    if not lrs:
        return arm, None
    try:
        lr = float(lrs[0][3:])
    except ValueError:
        raise UserError(f"arm {arm!r}: lr={lrs[0][3:]!r} is not a number") from None
    keep = [x for x in items if not x.startswith("lr=")]
    return head + (sep + "/".join(keep) if keep else ""), lr


def _settings(args, base_desc: str) -> dict:
    keys = ("tasks", "steps", "batch_size", "seq_len", "max_test", "max_valid", "targets", "rank", "set",
            "mta_stage2_steps", "pool", "schedule", "transfer", "prior_size", "prior_steps", "lr")
    # "recipe" names the training code's behaviour: bump it when a change alters results under the same flags
    return {k: getattr(args, k) for k in keys} | {"base": base_desc, "recipe": RECIPE}


def _cache_file(cache: Path, kind: str, arm: str, lr: float, size: int, seed: int, task: str = "") -> Path:
    safe = arm.replace(":", "_").replace("/", "+").replace("=", "-")
    return cache / f"{kind}__{safe}__lr{lr:g}__n{size}__s{seed}{'__' + task if task else ''}.json"


def summarise(runs: dict, arms: list[str], sizes: list[int], tasks: list[str], claims_spec: list) -> dict:
    """Per arm and size: test accuracy (mean over seeds, Student-t 95% interval over seeds); the
    claims' paired per-seed differences with megamoe.stats' verdicts (Holm over the table's claims)."""
    import numpy as np

    from megamoe import stats
    from megamoe.finetune.run import routing_learned

    rows, per_seed = [], {}
    for size in sizes:
        for arm in arms:
            rs = [runs[k] for k in sorted(runs) if k[0] == arm and k[1] == size]
            if not rs:
                continue
            per_seed[(arm, size)] = {r["seed"]: r["avg_acc"] for r in rs}
            present = [t for t in range(len(tasks)) if rs[0]["per_task_acc"][t] is not None]
            iv = stats.paired_interval([r["avg_acc"] for r in rs])
            learned = [x for x in (routing_learned(r["routing_entropy"]) for r in rs) if x is not None]
            rows.append({"arm": arm, "label": label(arm), "size": size, "seeds": len(rs), "lr": rs[0]["lr"],
                         "per_task": [float(np.mean([r["per_task_acc"][t] for r in rs])) if t in present else None
                                      for t in range(len(tasks))],
                         "avg": iv.mean, "avg_ci": [iv.lo, iv.hi],
                         "valid_avg": float(np.mean([r["valid_avg_acc"] for r in rs])),
                         "adapter_params": rs[0]["adapter_params"], "trainable_params": rs[0]["trainable_params"],
                         "routing_entropy": [float(np.mean([r["routing_entropy"][i] for r in rs]))
                                             if rs[0]["routing_entropy"][0] is not None else None for i in (0, 1)],
                         "routing_learned": (all(learned) if learned else None),
                         "adapters_moved": (None if any(r.get("adapters_moved") is None for r in rs)
                                            else all(r["adapters_moved"] for r in rs)),
                         "train_s": float(np.mean([r["train_s"] for r in rs]))})
    named = {}
    for size in sizes:
        for text, a, b, kind in claims_spec:
            a_list = [x for x in (a if isinstance(a, list) else [a]) if (x, size) in per_seed]
            if not a_list or (b, size) not in per_seed:
                continue
            if isinstance(a, list) and len(a_list) < len(a):  # say which arms the mean covers
                text = f"{text.split(' (')[0]} (mean of {', '.join(label(x) for x in a_list)})"
            common = sorted(set.intersection(*(set(per_seed[(x, size)]) for x in a_list + [b])))
            # lower is better in megamoe.stats: the difference of task-average *error*, a - b
            named[(text, size, kind)] = [per_seed[(b, size)][s] - float(np.mean([per_seed[(x, size)][s] for x in a_list]))
                                         for s in common]
    found = stats.verdicts({k: v for k, v in named.items()}, margin=MARGIN) if named else {}
    claims = [{"claim": text, "size": size, "kind": kind, "seeds": v.n, "diff": -v.mean, "ci": [-v.hi, -v.lo],
               "p_adj": v.p_adj, "p_tost_adj": v.p_tost_adj, "word": v.word, "outcome": outcome(kind, v.word)}
              for (text, size, kind), v in found.items()]
    return {"rows": rows, "claims": claims, "margin": MARGIN}


def markdown(res: dict) -> str:
    from megamoe.provenance import markdown_header

    s, tasks, st = res["summary"], res["tasks"], res["settings"]
    transfer = bool(st.get("transfer"))
    lines = ["# Multi-task fine-tuning suite" + (": few-shot transfer to held-out tasks" if transfer else ""), "",
             *([] if res["complete"] else [f"**INCOMPLETE: {res['done']} of {res['planned']} runs finished; the "
                                           "tables show what ran (resumable from the cache).**", ""]),
             markdown_header({k: res.get(k, "unknown") for k in ("command", "commit", "machine", "date")})
             + f"Base: {res['base']}", "", f"Base made by: {res['base_command']}", "",
             f"{len(tasks)} tasks, {st['steps']} steps x batch {st['batch_size']}, routing lr {res['routing_lr']}, "
             f"{st['schedule']} lr schedule, read-out: {POOL_DESC[st['pool']]}, sequence {st['seq_len']} tokens; "
             f"validation examples per task: " + ", ".join(f"{t} {n}" for t, n in zip(tasks, res["valid_counts"]))
             + "; test: " + ", ".join(f"{t} {n}" for t, n in zip(tasks, res["test_counts"])) + ".", ""]
    if transfer:
        lines += [f"Skills learned on {', '.join(t for t in tasks if t not in st['transfer'].split(','))} "
                  f"({st['prior_size']} examples per task, {st['prior_steps']} steps); then each held-out task "
                  f"({st['transfer']}) alone with k examples; rows average the held-out tasks.", ""]
    if res.get("selection"):
        lines += ["## Learning rates chosen on validation (seed %d, %s examples per task)" % (
                  res["select_seed"], res["select_size"]), "", "| arm | validation accuracy per lr | chosen |",
                  "|---|---|---|"]
        for arm, sel in res["selection"].items():
            lines.append(f"| {label(arm)} | " + ", ".join(f"{lr:g}: {a:.3f}" for lr, a in sel["valid"])
                         + f" | {sel['chosen']:g} |")
        lines.append("")
    for size in res["sizes"]:
        rows = [r for r in s["rows"] if r["size"] == size]
        if not rows:
            continue
        shown = [i for i, t in enumerate(tasks) if rows[0]["per_task"][i] is not None]
        lines += [f"## {size} training examples per task", "",
                  "| arm | lr | seeds | test average [95% CI] | " + " | ".join(tasks[i] for i in shown)
                  + " | adapter params | routing entropy start -> end |",
                  "|---|---|---|---|" + "---|" * len(shown) + "---|---|"]
        for r in rows:
            ent = r["routing_entropy"]
            ent_s = "-" if ent[0] is None else f"{ent[0]:.3f} -> {ent[1]:.3f}"
            if r["routing_learned"] is False:
                ent_s += " **routing did not learn**"
            if r.get("adapters_moved") is False:
                ent_s += " **adapters did not move (dead arm)**"
            ci = "n/a" if r["avg_ci"][0] != r["avg_ci"][0] else f"{r['avg_ci'][0]:.3f}, {r['avg_ci'][1]:.3f}"
            lines.append(f"| {r['label']} | {r['lr']:g} | {r['seeds']} | **{r['avg']:.3f}** [{ci}] | "
                         + " | ".join(f"{r['per_task'][i]:.3f}" for i in shown)
                         + f" | {r['adapter_params']:,} | {ent_s} |")
        lines.append("")
    if res.get("majority_acc"):
        lines += ["Majority class of each task's test set: " + ", ".join(
            f"{t} {a:.3f}" for t, a in zip(tasks, res["majority_acc"])) + ".", ""]
    if s["claims"]:
        lines += [f"## The papers' claims (paired over seeds; Holm over the {len(s['claims'])} comparisons; "
                  f"tie margin +-{s['margin']})", "",
                  "| claim | examples/task | seeds | accuracy difference | 95% CI | p (Holm) | verdict | outcome |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in s["claims"]:
            ci = "n/a" if c["ci"][0] != c["ci"][0] else f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"
            lines.append(f"| {c['claim']} | {c['size']} | {c['seeds']} | {c['diff']:+.3f} | {ci} | {c['p_adj']:.3g} | "
                         f"{c['word']} | {c['outcome']} |")
        lines.append("")
    lines += [res["note"], ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    arms = list(dict.fromkeys(r["arm"] for r in res["summary"]["rows"]))
    for i, arm in enumerate(arms):
        rows = sorted((r for r in res["summary"]["rows"] if r["arm"] == arm), key=lambda r: r["size"])
        x = [r["size"] * (1 + 0.02 * (i - len(arms) / 2)) for r in rows]
        y = [r["avg"] for r in rows]
        err = [[max(0.0, r["avg"] - r["avg_ci"][0]) for r in rows], [max(0.0, r["avg_ci"][1] - r["avg"]) for r in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label(arm))
    ax.set_xscale("log")
    ax.set_xlabel("training examples per task")
    ax.set_ylabel("task-average test accuracy")
    ax.set_title("Multi-task adapters (test accuracy, 95% t-intervals over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    from megamoe.utils import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _int_list(flag: str, text: str, minimum: int) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected a comma list of integers") from None
    if not values or min(values) < minimum:
        raise UserError(f"{flag} {text!r}: expected integers >= {minimum}")
    return values


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="runs/ft_base/hf",
                    help="native checkpoint (save_dir with 'latest' or a global_stepN dir) or HF export dir "
                         "(default: the fine-tuning base, made by " + FT_BASE_COMMAND + ")")
    ap.add_argument("--arms", default=None, help="comma list (default: the suite, see docs/finetuning.md); an arm "
                                                 "may carry AdapterConfig overrides and a fixed lr, e.g. lora:rank=16 "
                                                 "or cpoly:num_skills=8/lr=0.001; without lr= it is chosen on validation")
    ap.add_argument("--tasks", default=TASKS, help="tasks in --task-dir")
    ap.add_argument("--task-dir", default="data/tasks", help="output of tools/fetch_tasks.py")
    ap.add_argument("--tokenizer", default="data/tokenizer/spm.model", help="SentencePiece model of the base")
    ap.add_argument("--sizes", default=None, help="training examples per task (comma list, run in this order; "
                                                  "default 300,100,1000, with --transfer 16,64,256)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps per run (MTA: per stage-1 / one-stage; default 300, --transfer 100)")
    ap.add_argument("--mta-stage2-steps", type=int, default=150, help="MTA two-stage: router-only steps on top")
    ap.add_argument("--batch-size", type=int, default=32, help="examples per step (tasks mixed)")
    ap.add_argument("--seq-len", type=int, default=32, help="tokens kept per example (32: the suite's CPU budget)")
    ap.add_argument("--lr", type=float, default=1e-2,
                    help="--save runs, and --transfer's skill learning: AdamW peak lr of adapters and head")
    ap.add_argument("--lr-grid", default="0.003,0.01,0.03",
                    help="lrs tried on validation for every arm without lr= (seed --seeds[0], size --sizes[0])")
    ap.add_argument("--pool", default="mean", choices=("mean", "last"),
                    help="classifier read-out: mean of the real tokens' final hidden states, or the last token's")
    ap.add_argument("--schedule", default="linear", choices=("linear", "constant"),
                    help="lr schedule: 6%% linear warmup then linear decay (mttl's default), or constant")
    ap.add_argument("--max-test", type=int, default=500,
                    help="test examples per task (fewer if the task has fewer; 500 keeps the suite in its 6 h)")
    ap.add_argument("--max-valid", type=int, default=200, help="validation examples per task, carved from train")
    ap.add_argument("--targets", default="q_proj,v_proj", help="adapted projections, or 'all'")
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank of the LoRA-family arms")
    ap.add_argument("--set", nargs="*", default=["bottleneck=4"], metavar="FIELD=VALUE",
                    help="AdapterConfig fields for every arm (default bottleneck=4: MTA about Poly's size)")
    ap.add_argument("--transfer", default=None, metavar="TASK,TASK",
                    help=f"few-shot transfer: learn skills on the other tasks, adapt to these alone (e.g. {HELD_OUT})")
    ap.add_argument("--prior-size", type=int, default=1000, help="--transfer: examples per skill task")
    ap.add_argument("--prior-steps", type=int, default=300, help="--transfer: steps of skill learning")
    ap.add_argument("--cache", default="runs/finetune_cache", help="per-run results (resumable)")
    ap.add_argument("--out", default=None, help="writes OUT.json, OUT.md, OUT.png (default results/finetune, "
                                                "with --transfer results/finetune_transfer)")
    ap.add_argument("--save", default=None, help="one run only: save its adapters (+ head) to this directory")
    ap.add_argument("--deepspeed", action="store_true", help="data parallel under DeepSpeed (launch with deepspeed/torchrun)")
    ap.add_argument("--quick", action="store_true",
                    help="a few minutes: arms " + QUICK_ARMS + " (--transfer: " + QUICK_TRANSFER_ARMS + "), size 100 "
                         "(--transfer 16), seeds 0,1, 20 steps, lr grid 0.003,0.03, 100 test / 50 validation examples")
    ap.add_argument("--report", action="store_true",
                    help="only rebuild OUT.* from the cached runs (missing runs are reported, not run)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)
    transfer = args.transfer is not None
    args.sizes = args.sizes or ("16,64,256" if transfer else "300,100,1000")
    args.steps = (100 if transfer else 300) if args.steps is None else args.steps
    args.out = args.out or ("results/finetune_transfer" if transfer else "results/finetune")
    if args.quick:
        args.arms = args.arms or (QUICK_TRANSFER_ARMS if transfer else QUICK_ARMS)
        args.sizes, args.seeds, args.steps, args.mta_stage2_steps = ("16" if transfer else "100"), "0,1", 20, 10
        args.max_test, args.max_valid, args.lr_grid, args.prior_steps, args.prior_size = 100, 50, "0.003,0.03", 20, 100
    sizes, seeds = _int_list("--sizes", args.sizes, 1), _int_list("--seeds", args.seeds, 0)
    for flag in ("steps", "batch_size", "seq_len", "max_test", "max_valid", "rank", "prior_size", "prior_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    try:
        grid = [float(x) for x in args.lr_grid.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--lr-grid {args.lr_grid!r}: expected a comma list of numbers") from None
    if not grid or min(grid) <= 0:
        raise UserError(f"--lr-grid {args.lr_grid!r}: expected learning rates > 0")
    tasks = [t for t in args.tasks.split(",") if t]
    held = [t for t in (args.transfer or "").split(",") if t]
    if transfer and (not held or set(held) - set(tasks) or set(held) == set(tasks)):
        raise UserError(f"--transfer {args.transfer!r}: give tasks of --tasks, leaving at least one to learn skills on")

    import torch
    import yaml

    from megamoe.finetune.base_model import load_base
    from megamoe.finetune.config import AdapterConfig
    from megamoe.finetune.data import load_tasks, subset
    from megamoe.finetune.run import finetune_method, parse_method

    extra = {}
    for item in args.set or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected FIELD=VALUE")
        k, v = item.split("=", 1)
        extra[k] = yaml.safe_load(v)
    try:
        adapter_cfg = AdapterConfig(target_modules=args.targets.split(","), rank=args.rank, **extra)
    except TypeError as e:
        raise UserError(f"--set: {e}") from None
    arms = [a for a in (args.arms or (TRANSFER_ARMS if transfer else default_arms(len(tasks), adapter_cfg))).split(",")
            if a]
    for a in arms:
        parse_method(split_lr(a)[0].removesuffix("+skills"))
    if args.save and (len(arms), len(sizes), len(seeds)) != (1, 1, 1):
        raise UserError("--save: give exactly one --arms, one --sizes and one --seeds")

    dp = args.deepspeed
    if dp:
        # DeepSpeed's accelerator must match the backend below: on a GPU machine its engine puts
        # the model on cuda:LOCAL_RANK (as megamoe.finetune.run does), elsewhere it stays on the CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        import deepspeed

        from megamoe.utils import skip_deepspeed_shm_op

        skip_deepspeed_shm_op()
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    torch.set_num_threads(1 if dp else min(2, torch.get_num_threads()))
    if not Path(args.tokenizer).exists():
        raise UserError(f"--tokenizer {args.tokenizer} not found (the base's SentencePiece model)")
    base = load_base(args.base)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=args.tokenizer).vocab_size()
    if base.vocab_size < vocab:
        raise UserError(f"base vocab_size={base.vocab_size} < tokenizer's {vocab}: wrong --tokenizer?")
    settings = _settings(args, base.description)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(args.cache) / key
    cache.mkdir(parents=True, exist_ok=True)
    from megamoe.utils import atomic_path, atomic_write_text, claim

    atomic_write_text(cache / "settings.json", json.dumps(settings, indent=2) + "\n")  # processes may share a cache
    rank0 = not dp or int(os.environ.get("RANK", "0")) == 0
    data_cache = {}

    def data(size, seed):
        if (size, seed) not in data_cache:
            data_cache.clear()
            data_cache[(size, seed)] = load_tasks(args.task_dir, tasks, args.tokenizer, args.seq_len, size,
                                                  args.max_test, seed, args.max_valid)
        return data_cache[(size, seed)]

    meta, _, valid_all, test_all = data(sizes[0], seeds[0])
    num_classes = [len(meta[t]["labels"]) for t in tasks]
    T = len(tasks)
    priors = {}

    def prior_state(spec, seed):
        """Skills learned on the non-held-out tasks (transfer), cached as a .pt per (arm, seed)."""
        f = _cache_file(cache, "prior", spec, args.lr, args.prior_size, seed).with_suffix(".pt")
        if (spec, seed) not in priors:
            with claim(f, wait=True) as mine:
                if not mine:
                    priors.clear()
                    priors[(spec, seed)] = torch.load(f)
                    return priors[(spec, seed)]
                train = load_tasks(args.task_dir, tasks, args.tokenizer, args.seq_len, args.prior_size, 1, seed,
                                   args.max_valid)[1]
                keep = ~torch.isin(train.tasks, torch.tensor([tasks.index(t) for t in held]))
                train = type(train)(train.ids[keep], train.lengths[keep], train.labels[keep], train.tasks[keep])
                r = finetune_method(spec, base.build, base.hidden_size, num_classes, train, None, adapter_cfg,
                                    args.prior_steps, args.batch_size, args.lr, seed, args.mta_stage2_steps,
                                    pool=args.pool, schedule=args.schedule, keep_state=True)
                priors.clear()
                priors[(spec, seed)] = r["state"]
                with atomic_path(f) as tmp:
                    torch.save(r["state"], tmp)
        return priors[(spec, seed)]

    def compute(arm, spec, lr, size, seed, final, task, f):
        _, train, valid, test = data(size, seed)
        if task:
            t = tasks.index(task)
            train, valid, test = subset(train, t), subset(valid, t), subset(test, t)

        def save(clf, inj, arm=arm):
            if args.save and rank0:
                from megamoe.finetune.inject import save_adapters

                extra_t = {"head.weight": clf.head.weight, "head.bias": clf.head.bias, "tasks": tasks,
                           "num_classes": num_classes, "arm": arm, "base": base.description, "pool": args.pool}
                if inj is None:
                    raise UserError("--save: the head arm has no adapters to save")
                save_adapters(inj, args.save, extra_t)

        init = prior_state(spec, seed) if arm.endswith("+skills") else None
        r = finetune_method(spec, base.build, base.hidden_size, num_classes, train, test if final else None,
                            adapter_cfg, args.steps, args.batch_size, lr, seed, args.mta_stage2_steps, dp=dp,
                            on_model=save, pool=args.pool, schedule=args.schedule, valid=valid,
                            init_state=init)
        r |= {"size": size, "seed": seed, "lr": lr, "task": task}
        if rank0:
            atomic_write_text(f, json.dumps(r) + "\n")
            print(f"{arm}{' ' + task if task else ''} lr={lr:g} n={size} seed={seed}: valid "
                  f"{r['valid_avg_acc']:.3f} ({r['train_s']:.0f} s train, {time.time() - t_start:.0f} s total)",
                  flush=True)
        return r

    def one_run(arm, lr, size, seed, final):
        """One cached run: every task together, or (transfer) each held-out task alone, merged.
        A selection run (``final`` False) evaluates validation only."""
        spec = arm.removesuffix("+skills")
        parts = held if transfer else [""]
        results = []
        for task in parts:
            f = _cache_file(cache, "final" if final else "select", arm, lr, size, seed, task)
            if f.exists() and not args.save:
                results.append(json.loads(f.read_text()))
                continue
            if args.report:
                return None
            if args.save or dp:  # one chosen run, or ranks that must all run it together
                results.append(compute(arm, spec, lr, size, seed, final, task, f))
                continue
            with claim(f, wait=False) as mine:
                if not mine:  # finished or in progress elsewhere
                    if not f.exists():
                        return None
                    results.append(json.loads(f.read_text()))
                    continue
                results.append(compute(arm, spec, lr, size, seed, final, task, f))
        if len(results) == 1:
            return results[0]
        merged = dict(results[0])  # the held-out tasks' runs, averaged as one row
        for prefix in ("valid_",) + (("",) if final else ()):
            acc = [None] * T
            for r in results:
                acc[tasks.index(r["task"])] = r[f"{prefix}per_task_acc"][tasks.index(r["task"])]
            merged |= {f"{prefix}per_task_acc": acc, f"{prefix}avg_acc": sum(a for a in acc if a is not None) / len(results)}
        merged["routing_entropy"] = results[0]["routing_entropy"]
        merged["adapters_moved"] = None if any(r["adapters_moved"] is None for r in results) else \
            all(r["adapters_moved"] for r in results)
        return merged

    from megamoe.provenance import provenance

    tasks_shown = held if transfer else tasks
    res = {**provenance("python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(argv or sys.argv[1:]))),
           "base": base.description + (f"; valid perplexity {base.valid_ppl:.1f}" if base.valid_ppl else ""),
           "base_command": FT_BASE_COMMAND if base.run_name == "ft_base" else
           f"not the committed fine-tuning base (run name {base.run_name!r}); see docs/finetuning.md#the-base",
           "tasks": tasks, "num_classes": num_classes, "sizes": sorted(sizes), "seeds": seeds, "arms": arms,
           "settings": settings, "routing_lr": adapter_cfg.routing_lr, "adapter_config": vars(adapter_cfg),
           "valid_counts": [int((valid_all.tasks == t).sum()) for t in range(T)],
           "test_counts": [int((test_all.tasks == t).sum()) for t in range(T)],
           "majority_acc": [float(torch.bincount(test_all.labels[test_all.tasks == t]).max()) /
                            max(1, int((test_all.tasks == t).sum())) for t in range(T) if tasks[t] in tasks_shown],
           "note": ("CPU suite: a small pretrained base, frozen; the LoRA-family arms share alpha/r = 1/r. Learning "
                    "rates, the recipe and the steps were chosen on validation (carved from train); the test split "
                    "is read by the final runs only. Verdicts: megamoe.stats (paired t over seeds, Holm, TOST at "
                    f"+-{MARGIN}); a gap that is neither significant nor inside the margin is 'not resolved'. wiki_* "
                    "and brown_* texts are in the pretraining corpus (their labels are not).")}
    res["majority_acc"] = res["majority_acc"] if not transfer else None
    t_start = time.time()
    sel_size, sel_seed = sizes[0], seeds[0]
    lrs, selection, done, planned = {}, {}, 0, 0
    for arm in arms:
        spec, fixed = split_lr(arm)
        if fixed is not None or args.save or len(grid) == 1:
            lrs[arm] = fixed if fixed is not None else (args.lr if args.save else grid[0])
            continue
        found = {lr: one_run(spec, lr, sel_size, sel_seed, final=False) for lr in grid}
        planned += len(grid)
        if any(r is None for r in found.values()):
            continue
        done += len(grid)
        valid = {lr: r["valid_avg_acc"] for lr, r in found.items()}
        lrs[arm] = max(grid, key=lambda lr: valid[lr])  # ties: the first in the grid
        selection[arm] = {"valid": [[lr, valid[lr]] for lr in grid], "chosen": lrs[arm]}
    runs = {}
    for size in sizes:
        for seed in seeds:
            for arm in arms:
                planned += 1
                if arm not in lrs:
                    continue
                r = one_run(split_lr(arm)[0], lrs[arm], size, seed, final=True)
                if r is not None:
                    runs[(arm, size, seed)] = r
                    done += 1
    if not rank0:
        return 0
    if args.save:
        print(f"saved adapters to {args.save}")
        return 0
    res |= {"selection": selection, "select_size": sel_size, "select_seed": sel_seed,
            "summary": summarise(runs, arms, sorted(sizes), tasks, TRANSFER_CLAIMS if transfer else
                                 claims(T, adapter_cfg)),
            "done": done, "planned": planned, "complete": done == planned}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(res))
    plot(res, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    main()
