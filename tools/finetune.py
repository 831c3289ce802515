#!/usr/bin/env python
"""Multi-task fine-tuning of a megamoe model: the adapter suite, or one run that saves its adapters.

    python tools/fetch_tasks.py                                   # once: data/tasks/*.jsonl
    python tools/finetune.py --base runs/demo/checkpoints         # the suite -> results/finetune.{json,md,png}
    python tools/finetune.py --base hf/demo --arms lora --sizes 300 --seeds 0 --save out/lora   # one run, saved
    deepspeed --num_gpus 2 tools/finetune.py --deepspeed --base hf/demo --arms poly --sizes 300 --seeds 0 --save out/poly
    python tools/finetune.py --quick ...                          # minutes: fewer arms, steps, test examples

``--base``: a native checkpoint (training save_dir, one global_stepN dir, or a convert_from_hf
output) or an HF export directory (stock Llama / Mixtral or the ``megamoe`` architecture).
Fine-tuning runs on the HF model (megamoe/finetune/base_model.py). The base is frozen; every
arm trains its adapters plus one shared classification head (``head`` = that head alone).

Suite: every arm x training size (examples per task) x seed; each run is cached as
``CACHE/<settings hash>/<arm>__n<size>__s<seed>.json`` the moment it finishes, so an interrupted
suite resumes where it stopped and the tables are rebuilt from the cache. Results: per arm and
size, accuracy (mean over seeds) with a bootstrap 95% interval (resampling seeds and test
examples, per task and on the task average), paired-bootstrap intervals for the papers' claims,
and the routing validity check (task-skill routing entropy must fall during training, else the
row says "routing did not learn").

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
# Arms (issue 11): head only; shared LoRA at Poly's trainable size (S*r = 16); private LoRA per
# task (C-Poly's private part alone); LoRA r=1 (TensorPoly's size class); the routed methods.
ARMS = "lora:rank=16,poly,cpoly,tensorpoly1,mta,mta_one,head,cpoly:num_skills=0,lora:rank=1,tensorpoly2"
QUICK_ARMS = "head,lora:rank=16,poly,cpoly,tensorpoly1,mta,mta_one"
LABELS = {"lora:rank=16": "shared LoRA r=16 (Poly's size)", "cpoly:num_skills=0": "private LoRA per task (r=4)",
          "lora:rank=1": "LoRA r=1 (TensorPoly's size class)", "head": "head only", "poly": "Poly",
          "cpoly": "C-Poly", "tensorpoly1": "TensorPoly-I", "tensorpoly2": "TensorPoly-II",
          "mta": "MTA two-stage", "mta_one": "MTA one-stage"}
RECIPE = 2
POOL_DESC = {"mean": "mean of the real tokens' final states", "last": "last real token's final state"}
# (label, arm a, arm b or a list averaged): "a - b" with a paired bootstrap interval
CLAIMS = [("modular > shared LoRA (mean of Poly, C-Poly, TensorPoly-I/II, MTA)",
           ["poly", "cpoly", "tensorpoly1", "tensorpoly2", "mta"], "lora:rank=16"),
          ("C-Poly >= Poly", "cpoly", "poly"),
          ("TensorPoly-I ~ Poly (with fewer parameters)", "tensorpoly1", "poly"),
          ("MTA two-stage >= one-stage", "mta", "mta_one"),
          ("validity: shared LoRA r=16 > head only", "lora:rank=16", "head")]


def _settings(args, base_desc: str) -> dict:
    keys = ("tasks", "steps", "batch_size", "lr", "seq_len", "max_test", "targets", "rank", "set", "mta_stage2_steps",
            "pool", "schedule")
    # "recipe" names the training code's behaviour: bump it when a change alters results under the
    # same flags (2: --pool/--schedule; runs cached before them used last-token pooling at constant lr)
    return {k: getattr(args, k) for k in keys} | {"base": base_desc, "recipe": RECIPE}


def _cache_file(cache: Path, arm: str, size: int, seed: int) -> Path:
    safe = arm.replace(":", "_").replace("/", "+").replace("=", "-")
    return cache / f"{safe}__n{size}__s{seed}.json"


def bootstrap(right: "np.ndarray", tasks: "np.ndarray", T: int, draws: int = 1000, seed: int = 0):
    """right [R seeds, N] 0/1 -> (per-task [T, draws], average [draws]) accuracy draws, resampling
    seeds and, within each task, test examples (the same draws for every arm: pass the same seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    R = right.shape[0]
    seed_idx = rng.integers(0, R, (draws, R))
    per_task = np.zeros((T, draws))
    for t in range(T):
        cols = np.where(tasks == t)[0]
        ex = rng.integers(0, len(cols), (draws, len(cols)))
        acc_seed = right[:, cols][:, ex].mean(-1)           # [R, draws]
        per_task[t] = np.take_along_axis(acc_seed.T, seed_idx, 1).mean(1)
    return per_task, per_task.mean(0)


def summarise(runs: dict, arms: list[str], sizes: list[int], tasks: list[str], test_tasks) -> dict:
    """Means and bootstrap 95% intervals per arm and size, and the claims' paired intervals."""
    import numpy as np

    from megamoe.finetune.run import routing_learned

    T = len(tasks)
    rows, draws = [], {}
    for size in sizes:
        for arm in arms:
            rs = [runs[(arm, size, s)] for s in sorted({k[2] for k in runs}) if (arm, size, s) in runs]
            if not rs:
                continue
            right = np.array([[c == "1" for c in r["right"]] for r in rs], dtype=float)
            per_task, avg = bootstrap(right, test_tasks, T)
            draws[(arm, size)] = {r["seed"]: row for r, row in zip(rs, right)}
            mean_t = [float(np.mean([r["per_task_acc"][t] for r in rs])) for t in range(T)]
            learned = [x for x in (routing_learned(r["routing_entropy"]) for r in rs) if x is not None]
            rows.append({"arm": arm, "label": LABELS.get(arm, arm), "size": size, "seeds": len(rs),
                         "per_task": mean_t, "per_task_ci": np.percentile(per_task, [2.5, 97.5], axis=1).T.tolist(),
                         "avg": float(np.mean(mean_t)), "avg_ci": np.percentile(avg, [2.5, 97.5]).tolist(),
                         "avg_se_seeds": float(np.std([r["avg_acc"] for r in rs], ddof=1) / np.sqrt(len(rs)))
                         if len(rs) > 1 else None,
                         "adapter_params": rs[0]["adapter_params"], "trainable_params": rs[0]["trainable_params"],
                         "routing_entropy": [float(np.mean([r["routing_entropy"][i] for r in rs]))
                                             if rs[0]["routing_entropy"][0] is not None else None for i in (0, 1)],
                         "routing_learned": (all(learned) if learned else None),
                         "adapters_moved": (None if any(r.get("adapters_moved") is None for r in rs)
                                            else all(r["adapters_moved"] for r in rs)),
                         "train_s": float(np.mean([r["train_s"] for r in rs]))})
    claims = []
    for size in sizes:
        for label, a, b in CLAIMS:
            a_list = [x for x in (a if isinstance(a, list) else [a]) if (x, size) in draws]
            if not a_list or (b, size) not in draws:
                continue
            if isinstance(a, list) and len(a_list) < len(a):  # say which arms the mean covers
                label = f"{label.split(' (')[0]} (mean of {', '.join(LABELS.get(x, x) for x in a_list)})"
            # paired: the seeds every arm of the claim has, the same bootstrap draws for each arm
            common = sorted(set.intersection(*(set(draws[(x, size)]) for x in a_list + [b])))
            if not common:
                continue

            def avg_draws(x):
                return bootstrap(np.stack([draws[(x, size)][sd] for sd in common]), test_tasks, T)[1]

            da = np.mean([avg_draws(x) for x in a_list], axis=0)
            diff = da - avg_draws(b)
            lo, hi = np.percentile(diff, [2.5, 97.5])
            verdict = "reproduced" if lo > 0 else ("contradicted" if hi < 0 else "tie (interval spans 0)")
            if label.startswith("validity"):
                verdict = "adapters help" if lo > 0 else ("head only better" if hi < 0 else "tie: adapters do not help")
            if label.startswith("TensorPoly"):
                verdict = "reproduced (tie)" if lo <= 0 <= hi else ("TensorPoly-I better" if lo > 0 else "not reproduced")
            claims.append({"claim": label, "size": size, "seeds": len(common), "diff": float(diff.mean()),
                           "ci": [float(lo), float(hi)],
                           "verdict": verdict})
    return {"rows": rows, "claims": claims}


def markdown(res: dict) -> str:
    from megamoe.provenance import markdown_header

    s, tasks = res["summary"], res["tasks"]
    lines = ["# Multi-task fine-tuning suite", "",
             *([] if res["complete"] else [f"**INCOMPLETE: {res['done']} of {res['planned']} runs finished; the "
                                           "tables show what ran (resumable from the cache).**", ""]),
             markdown_header({k: res.get(k, "unknown") for k in ("command", "commit", "machine", "date")})
             + f"Base: {res['base']}", "",
             f"{len(tasks)} tasks, {res['settings']['steps']} steps x batch {res['settings']['batch_size']}, "
             f"adapter lr {res['settings']['lr']}, routing lr {res['routing_lr']}, "
             f"{res['settings'].get('schedule', 'constant')} lr schedule, read-out: "
             f"{POOL_DESC[res['settings'].get('pool', 'last')]}, sequence {res['settings']['seq_len']} tokens, "
             "test examples per task: "
             + ", ".join(f"{t} {n}" for t, n in zip(tasks, res["test_counts"])) + ".", "",
             "Accuracy: mean over seeds; [bootstrap 95% interval over seeds and test examples].", ""]
    for size in res["sizes"]:
        rows = [r for r in s["rows"] if r["size"] == size]
        if not rows:
            continue
        lines += [f"## {size} training examples per task", "",
                  "| arm | seeds | average [95% CI] | " + " | ".join(tasks) + " | adapter params | routing entropy start -> end |",
                  "|---|---|---|" + "---|" * len(tasks) + "---|---|"]
        for r in rows:
            ent = r["routing_entropy"]
            ent_s = "-" if ent[0] is None else f"{ent[0]:.3f} -> {ent[1]:.3f}"
            if r["routing_learned"] is False:
                ent_s += " **routing did not learn**"
            if r.get("adapters_moved") is False:
                ent_s += " **adapters did not move (dead arm)**"
            lines.append(f"| {r['label']} | {r['seeds']} | **{r['avg']:.3f}** [{r['avg_ci'][0]:.3f}, {r['avg_ci'][1]:.3f}] | "
                         + " | ".join(f"{a:.3f}" for a in r["per_task"]) + f" | {r['adapter_params']:,} | {ent_s} |")
        lines.append("")
    if res.get("majority_acc"):
        lines += ["Majority class of each task's test set: " + ", ".join(
            f"{t} {a:.3f}" for t, a in zip(tasks, res["majority_acc"])) + f" (average {sum(res['majority_acc']) / len(tasks):.3f}).", ""]
    if s["claims"]:
        lines += ["## The papers' claims (paired bootstrap, difference of task-average accuracy)", "",
                  "| claim | examples/task | seeds (shared) | difference | 95% CI | verdict |", "|---|---|---|---|---|---|"]
        for c in s["claims"]:
            lines.append(f"| {c['claim']} | {c['size']} | {c['seeds']} | {c['diff']:+.3f} | [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | "
                         f"{c['verdict']} |")
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
        err = [[r["avg"] - r["avg_ci"][0] for r in rows], [r["avg_ci"][1] - r["avg"] for r in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=LABELS.get(arm, arm))
    ax.set_xscale("log")
    ax.set_xlabel("training examples per task")
    ax.set_ylabel("task-average test accuracy")
    ax.set_title("Multi-task adapters (95% bootstrap intervals)")
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
    ap.add_argument("--base", default="runs/demo/checkpoints",
                    help="native checkpoint (save_dir with 'latest' or a global_stepN dir) or HF export dir")
    ap.add_argument("--arms", default=None, help=f"comma list (default: {ARMS}); an arm may carry AdapterConfig "
                                                 "overrides, e.g. lora:rank=16 or cpoly:private_skills=2/num_skills=8")
    ap.add_argument("--tasks", default=TASKS, help="tasks in --task-dir")
    ap.add_argument("--task-dir", default="data/tasks", help="output of tools/fetch_tasks.py")
    ap.add_argument("--tokenizer", default="data/tokenizer/spm.model", help="SentencePiece model of the base")
    ap.add_argument("--sizes", default="300,100,1000", help="training examples per task (comma list, run in this order)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run (MTA: per stage-1 / one-stage)")
    ap.add_argument("--mta-stage2-steps", type=int, default=150, help="MTA two-stage: router-only steps on top")
    ap.add_argument("--batch-size", type=int, default=32, help="examples per step (tasks mixed)")
    ap.add_argument("--seq-len", type=int, default=32, help="tokens kept per example (32: the suite's CPU budget)")
    ap.add_argument("--lr", type=float, default=1e-2, help="AdamW peak lr of adapters and head (routing: routing_lr)")
    ap.add_argument("--pool", default="mean", choices=("mean", "last"),
                    help="classifier read-out: mean of the real tokens' final hidden states, or the last token's")
    ap.add_argument("--schedule", default="linear", choices=("linear", "constant"),
                    help="lr schedule: 6%% linear warmup then linear decay (mttl's default), or constant")
    ap.add_argument("--max-test", type=int, default=1000, help="test examples per task (fewer if the task has fewer)")
    ap.add_argument("--targets", default="q_proj,v_proj", help="adapted projections, or 'all'")
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank of the LoRA-family arms")
    ap.add_argument("--set", nargs="*", default=["bottleneck=4"], metavar="FIELD=VALUE",
                    help="AdapterConfig fields for every arm (default bottleneck=4: MTA about Poly's size)")
    ap.add_argument("--cache", default="runs/finetune_cache", help="per-run results (resumable)")
    ap.add_argument("--out", default="results/finetune", help="writes OUT.json, OUT.md, OUT.png")
    ap.add_argument("--save", default=None, help="one run only: save its adapters (+ head) to this directory")
    ap.add_argument("--deepspeed", action="store_true", help="data parallel under DeepSpeed (launch with deepspeed/torchrun)")
    ap.add_argument("--quick", action="store_true",
                    help="a few minutes: arms " + QUICK_ARMS + ", size 100, seeds 0,1, 40 steps, 100 test examples")
    ap.add_argument("--report", action="store_true",
                    help="only rebuild OUT.* from the cached runs (missing runs are reported, not run)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)
    if args.quick:
        args.arms = args.arms or QUICK_ARMS
        args.sizes, args.seeds, args.steps, args.mta_stage2_steps, args.max_test = "100", "0,1", 40, 20, 100
    arms = [a for a in (args.arms or ARMS).split(",") if a]
    sizes, seeds = _int_list("--sizes", args.sizes, 1), _int_list("--seeds", args.seeds, 0)
    for flag in ("steps", "batch_size", "seq_len", "max_test", "rank"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    tasks = [t for t in args.tasks.split(",") if t]

    import torch
    import yaml

    from megamoe.finetune.base_model import load_base
    from megamoe.finetune.config import AdapterConfig
    from megamoe.finetune.data import load_tasks
    from megamoe.finetune.run import finetune_method, parse_method

    for a in arms:
        parse_method(a)
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
    from megamoe.utils import atomic_write_text

    atomic_write_text(cache / "settings.json", json.dumps(settings, indent=2) + "\n")  # processes may share a cache
    rank0 = not dp or int(os.environ.get("RANK", "0")) == 0

    runs, data_cache = {}, {}

    def data(size, seed):
        if (size, seed) not in data_cache:
            data_cache.clear()
            data_cache[(size, seed)] = load_tasks(args.task_dir, tasks, args.tokenizer, args.seq_len, size,
                                                  args.max_test, seed)
        return data_cache[(size, seed)]

    meta, _, test = data(sizes[0], seeds[0])
    num_classes = [len(meta[t]["labels"]) for t in tasks]
    from megamoe.provenance import provenance

    res = {**provenance("python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(argv or sys.argv[1:]))),
           "base": base.description + (f"; valid perplexity {base.valid_ppl:.1f}" if base.valid_ppl else ""),
           "tasks": tasks, "num_classes": num_classes, "sizes": sorted(sizes), "seeds": seeds, "arms": arms,
           "settings": settings, "routing_lr": adapter_cfg.routing_lr, "adapter_config": vars(adapter_cfg),
           "test_counts": [int((test.tasks == t).sum()) for t in range(len(tasks))],
           "majority_acc": [float(torch.bincount(test.labels[test.tasks == t]).max()) / max(1, int((test.tasks == t).sum()))
                            for t in range(len(tasks))],
           "note": ("CPU suite: a small pretrained base, frozen; the LoRA-family arms share alpha/r = 1/r. "
                    "A gap whose interval spans 0 is a tie. wiki_* and brown_* texts are in the pretraining "
                    "corpus (their labels are not).")}
    planned = [(a, n, s) for n in sizes for s in seeds for a in arms]
    t_start = time.time()
    for arm, size, seed in planned:
        f = _cache_file(cache, arm, size, seed)
        if f.exists() and not args.save:
            runs[(arm, size, seed)] = json.loads(f.read_text())
            continue
        if args.report:
            continue
        _, train, test = data(size, seed)

        def save(clf, inj, arm=arm):
            if args.save and rank0:
                from megamoe.finetune.inject import save_adapters

                extra_t = {"head.weight": clf.head.weight, "head.bias": clf.head.bias, "tasks": tasks,
                           "num_classes": num_classes, "arm": arm, "base": base.description,
                           "pool": args.pool}
                if inj is None:
                    raise UserError("--save: the head arm has no adapters to save")
                save_adapters(inj, args.save, extra_t)

        r = finetune_method(arm, base.build, base.hidden_size, num_classes, train, test, adapter_cfg, args.steps,
                            args.batch_size, args.lr, seed, args.mta_stage2_steps, dp=dp, on_model=save,
                            pool=args.pool, schedule=args.schedule)
        r |= {"size": size, "seed": seed}
        runs[(arm, size, seed)] = r
        if rank0:
            with open(str(f) + ".tmp", "w") as fh:
                json.dump(r, fh)
            os.replace(str(f) + ".tmp", f)
            print(f"{arm} n={size} seed={seed}: avg acc {r['avg_acc']:.3f} entropy {r['routing_entropy']} "
                  f"({r['train_s']:.0f} s train, {time.time() - t_start:.0f} s total)", flush=True)
    if not rank0:
        return 0
    if args.save:
        print(f"saved adapters to {args.save}")
        return 0
    res["summary"] = summarise(runs, arms, sorted(sizes), tasks, test.tasks.numpy())
    res["done"], res["planned"] = len(runs), len(planned)
    res["complete"] = len(runs) == len(planned)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(res))
    plot(res, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    main()
