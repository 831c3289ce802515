"""Evaluate a megamoe checkpoint: loss, perplexity and per-layer expert load.

    python tools/evaluate.py --checkpoint runs/demo/checkpoints                # valid split of the run's data
    python tools/evaluate.py --checkpoint runs/demo/checkpoints/global_step500 --split test
    python tools/evaluate.py --checkpoint CKPT --data-prefix data/other_text_document --split all
    python tools/evaluate.py --checkpoint CKPT --text-file notes.txt

Runs in one process whatever layout trained the checkpoint: it reads the checkpoint's canonical
shards (fp32 masters; megamoe/hf/checkpoint_reader.py) or a canonical ``model.safetensors``, and
``megamoe_config.yaml``. Prints and
writes ``eval.json`` (loss, perplexity, the perplexity of the best unigram model of the same
tokens, per-layer tokens per expert) and ``expert_load.png`` into ``--output``.

Trap: ``--split`` uses the training run's ``data.split`` shares; a dataset the run never saw
can be evaluated whole with ``--split all``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.errors import UserError, cli_main  # noqa: E402


def resolve_checkpoint(path: str) -> Path:
    """The checkpoint directory (a save_dir's ``latest`` tag, a global_stepN, or a canonical dir)."""
    from megamoe.hf.checkpoint_reader import resolve

    d, _ = resolve(path)
    return d


def read_text_file(path: str, skip_invalid: bool = False, what: str = "--text-file") -> str:
    """The file's text under the data pipeline's rules (megamoe/data/preprocess.py): invalid
    UTF-8 is an error naming the byte offset and line, unless ``skip_invalid`` drops the lines
    that do not decode (and says how many)."""
    from megamoe.data.inputs import first_invalid_utf8

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {path} not found")
    bad = first_invalid_utf8(p)
    if bad is None:
        return p.read_text(encoding="utf-8")
    if not skip_invalid:
        raise UserError(f"{what} {path}: invalid UTF-8 at byte offset {bad[0]} (line {bad[1]}); is it a text "
                        "file? Re-encode it as UTF-8, or pass --skip-invalid to drop such lines")
    kept, dropped = [], 0
    for line in p.read_bytes().split(b"\n"):
        try:
            kept.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            dropped += 1
    print(f"warning: {what} {path}: skipped {dropped} line(s) that are not valid UTF-8", file=sys.stderr)
    return "\n".join(kept)


def _text_batches(path: str, tokenizer: str, seq: int, mbs: int, max_batches: int, skip_invalid: bool = False):
    import torch

    from megamoe.data.tokenizer import load_sentencepiece

    text = read_text_file(path, skip_invalid)
    sp = load_sentencepiece(tokenizer)
    ids = []
    for line in text.split("\n\n"):
        if line.strip():
            ids += sp.encode(line.strip()) + [sp.eos_id()]
    n = (len(ids) - 1) // seq
    if n == 0:
        raise UserError(f"--text-file {path} has {len(ids)} tokens, fewer than one sequence of {seq + 1}")
    t = torch.tensor(ids[: n * seq + 1])
    x, y = t[:-1].view(n, seq), t[1:].view(n, seq)
    for b in range(0, min(n, mbs * max_batches), mbs):
        yield {"input_ids": x[b:b + mbs], "labels": y[b:b + mbs], "loss_mask": torch.ones_like(y[b:b + mbs]).float()}


def _dataset_batches(run, split: str, mbs: int, max_batches: int):
    from megamoe.data import build_datasets, build_loader

    want = mbs * max_batches
    data = run.data
    if split == "all":
        data.split = "1,0,0"
        split = "train"
    idx = {"train": 0, "valid": 1, "test": 2}[split]
    sizes = [0, 0, 0]
    sizes[idx] = want
    ds = build_datasets(data, *sizes, model_vocab_size=run.model.vocab_size)[idx]
    # one pass over the split at most (megatron-core repeats epochs to reach `want`)
    n_unique = min(len(ds), want)
    for i, batch in enumerate(build_loader(ds, mbs, mbs)):
        if i * mbs >= n_unique:
            break
        yield batch


def plot_expert_load(loads: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megamoe.utils import atomic_path

    n = max(1, len(loads))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3), squeeze=False)
    for ax, (name, frac) in zip(axes[0], loads.items()):
        ax.bar(range(len(frac)), frac)
        ax.axhline(1.0 / len(frac), color="k", lw=0.8, ls="--")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert")
    axes[0][0].set_ylabel("fraction of routed tokens")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def evaluate_checkpoint(ckpt: Path, split: str = "valid", data_prefix: str | None = None, text_file: str | None = None,
                        micro_batch_size: int = 8, max_batches: int = 50, skip_invalid: bool = False) -> dict:
    import torch
    from megamoe import parallel
    from megamoe.config import from_dict
    from megamoe.model.gpt import build_model
    from megamoe.model.state_dict import load_full_state_dict
    from megamoe.run_config import RunConfig
    from megamoe.utils import progress
    import yaml

    cfg = yaml.safe_load((ckpt / "megamoe_config.yaml").read_text())
    cfg["parallel"] = {}
    cfg["train"]["deepspeed_config"] = None
    run = from_dict(RunConfig, cfg)
    if data_prefix:
        run.data.data_path = [data_prefix]
        run.data.tokenizer_model = run.data.tokenizer_model  # keep; metadata check still applies
    parallel.init_cpu_parallel(run.parallel)  # the model runs on the CPU here, also on a GPU machine
    model = build_model(run.model, run.moe, run.parallel)
    from megamoe.hf.checkpoint_reader import open_canonical

    with open_canonical(ckpt) as sd:  # one tensor at a time: the fp32 masters of any layout
        load_full_state_dict(model, sd)
    model.eval()
    if text_file:
        tok = run.data.tokenizer_model
        if tok is None:
            from megamoe.data.indexed import read_meta, tokenizer_path_from_meta

            prefix = run.data.blend()[0][0]
            meta = read_meta(prefix)
            if meta is None:
                raise UserError("no tokenizer known: the run had no data.tokenizer_model and no dataset metadata")
            tok = str(tokenizer_path_from_meta(prefix, meta))
        batches = _text_batches(text_file, tok, run.data.seq_length, micro_batch_size, max_batches, skip_invalid)
        source = text_file
    else:
        batches = _dataset_batches(run, split, micro_batch_size, max_batches)
        source = f"{run.data.data_path} split={split}"
    layers = run.moe.moe_layer_indices(run.model.num_layers)
    nll, ntok, counts, tpe = 0.0, 0.0, None, {}
    with torch.no_grad():
        for batch in progress(batches, total=max_batches, desc="eval", unit="batch"):
            out = model(batch["input_ids"], batch["labels"], batch["loss_mask"])
            m = batch["loss_mask"]
            w = float(m.sum())
            nll += float(out.lm_loss) * w
            ntok += w
            c = torch.bincount(batch["labels"][m > 0], minlength=run.model.vocab_size).double()
            counts = c if counts is None else counts + c
            for li, s in zip(layers, out.moe_stats):
                t = torch.as_tensor(s.tokens_per_expert).double()
                tpe[li] = tpe.get(li, 0) + t
    if ntok == 0:
        raise UserError(f"no tokens to evaluate in {source}")
    p = counts / counts.sum()
    p = p[p > 0]
    loss = nll / ntok
    # a real unigram model: token frequencies of the whole corpus (tools/count_tokens.py), add-one
    unigram_corpus = None
    counts_file = Path(f"{run.data.blend()[0][0]}.counts.npy")
    if counts_file.is_file() and not text_file:
        import numpy as np

        q = torch.from_numpy(np.load(counts_file)).double()[: run.model.vocab_size]
        q = torch.nn.functional.pad(q, (0, run.model.vocab_size - q.numel())) + 1.0
        q = q / q.sum()
        unigram_corpus = math.exp(float(-(counts * q.log()).sum() / counts.sum()))
    loads = {f"layer {li} ({run.moe.routing_kind(li, run.model.num_layers)})": (t / t.sum()).tolist()
             for li, t in sorted(tpe.items())}
    return {"checkpoint": str(ckpt), "source": source, "tokens": int(ntok), "lm_loss": loss,
            "ppl": math.exp(min(loss, 50)), "unigram_ppl": math.exp(float(-(p * p.log()).sum())),
            "unigram_corpus_ppl": unigram_corpus,
            "expert_load": loads,
            "max_over_mean_load": {k: max(v) * len(v) for k, v in loads.items()}}


@cli_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir (a save_dir with 'latest', or a global_stepN dir)")
    ap.add_argument("--split", default="valid", choices=["train", "valid", "test", "all"],
                    help="split of the indexed dataset (the run's data.split shares; 'all' = the whole dataset)")
    ap.add_argument("--data-prefix", default=None, help="evaluate another indexed dataset (PREFIX without .bin/.idx)")
    ap.add_argument("--text-file", default=None, help="evaluate a plain text file (paragraphs separated by blank lines)")
    ap.add_argument("--skip-invalid", action="store_true",
                    help="--text-file: drop lines that are not valid UTF-8 (default: refuse the file)")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward pass")
    ap.add_argument("--max-batches", type=int, default=50, help="evaluate at most this many batches")
    ap.add_argument("--output", default=None, help="directory for eval.json and expert_load.png (default: checkpoint dir/eval)")
    args = ap.parse_args(argv)
    if args.data_prefix and args.text_file:
        raise UserError("pass either --data-prefix or --text-file, not both")
    if args.text_file and not args.skip_invalid:  # refuse a non-text file before loading any model
        read_text_file(args.text_file)
    ckpt = resolve_checkpoint(args.checkpoint)
    res = evaluate_checkpoint(ckpt, args.split, args.data_prefix, args.text_file, args.micro_batch_size,
                              args.max_batches, args.skip_invalid)
    out = Path(args.output) if args.output else ckpt / "eval"
    out.mkdir(parents=True, exist_ok=True)
    from megamoe.utils import atomic_write_text

    atomic_write_text(out / "eval.json", json.dumps(res, indent=2) + "\n")
    if res["expert_load"]:
        plot_expert_load(res["expert_load"], out / "expert_load.png")
    print(f"\nevaluated {res['checkpoint']} on {res['source']}: {res['tokens']} tokens")
    print(f"  lm loss {res['lm_loss']:.4f}   perplexity {res['ppl']:.2f}   "
          f"unigram perplexity {res['unigram_ppl']:.2f} (best unigram model of the same tokens)")
    if res["unigram_corpus_ppl"]:
        print(f"  unigram perplexity {res['unigram_corpus_ppl']:.2f} (corpus token frequencies, add-one smoothed)")
    for k, v in res["expert_load"].items():
        print(f"  expert load {k}: " + " ".join(f"{x:.3f}" for x in v) + f"   (max/mean {max(v) * len(v):.2f})")
    print(f"  wrote {out / 'eval.json'}" + (f" and {out / 'expert_load.png'}" if res["expert_load"] else ""))
    return 0


if __name__ == "__main__":
    main()
