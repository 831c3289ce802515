#!/usr/bin/env python
"""What the experts of a checkpoint do on a dataset: load, favourite tokens, cross-layer routing
agreement, drops, router entropy against position.

    python tools/analyze_experts.py --checkpoint runs/demo/checkpoints              # valid split
    python tools/analyze_experts.py --checkpoint CKPT --split all --data-prefix data/other_text_document
    python tools/analyze_experts.py --checkpoint CKPT --text-file notes.txt --output results/analysis

Runs in one process whatever TP/EP/DP layout wrote the checkpoint (megamoe.hf.checkpoint_reader
reads its canonical tensors), in eval mode, so routing uses ``eval_capacity_factor``. Writes
into ``--output`` (default: CHECKPOINT/analysis):

- ``analysis.json``: per MoE layer the fraction of routed (token, choice) pairs per expert and
  max/mean; each expert's most frequent first-choice tokens (as text, with the share of that
  token's occurrences the expert received); the dropped fraction at the eval capacity factor
  (what the model ran) and at the training capacity factor (recomputed from the same logits);
  mean router entropy per position (learned layers). Between every two MoE layers, the
  normalised mutual information (NMI) of their first-choice experts: 1 = one layer's choice
  determines the other's (up to relabelling), 0 = independent.
- ``load.png`` (layers x experts), ``agreement.png`` (layers x layers NMI),
  ``entropy_position.png`` (learned layers x positions) heat maps.

Text input follows the data pipeline's rules: invalid UTF-8 is an error naming the byte offset
unless ``--skip-invalid`` (tools/evaluate.py ``read_text_file``).

Traps: the first choice of a learned router is the top-1 expert (slot 0), of a hash layer hash
0. Token ids are counted at the layer's input (the current token), so for ``previous`` /
``bigram`` / ``oracle_future`` hash layers an expert's favourite tokens are not its key.
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


def nmi(a_N, b_N, na: int, nb: int) -> float:
    """Normalised mutual information I(a;b) / sqrt(H(a) H(b)) of two label vectors (0 if either
    is constant)."""
    import torch

    joint = torch.zeros(na, nb, dtype=torch.float64)
    joint.index_put_((a_N, b_N), torch.ones(len(a_N), dtype=torch.float64), accumulate=True)
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)

    def h(q):
        q = q[q > 0]
        return float(-(q * q.log()).sum())

    ha, hb = h(pa), h(pb)
    if ha <= 0 or hb <= 0:
        return 0.0
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum())
    return max(0.0, min(1.0, mi / math.sqrt(ha * hb)))


class _Recorder:
    """Forward hooks on every MoE layer's router: per layer, first-choice expert, token id,
    position, kept flags, entropy and the drops the training capacity would cause."""

    def __init__(self, model, layers: list[int]):
        self.layers, self.rec = layers, {li: {"expert": [], "token": [], "pos": [], "kept": [], "pairs": 0,
                                              "kept_pairs": 0, "train_kept_pairs": 0, "entropy": [], "load": None}
                                         for li in layers}
        self.handles = [model.layers[li].moe.router.register_forward_hook(self._hook(li)) for li in layers]

    def _hook(self, li):
        def hook(router, args, out):
            import torch

            x_TD, ctx = args[0], args[1] if len(args) > 1 else None
            r = self.rec[li]
            E = router.num_experts
            r["expert"].append(out.expert_ids_TK[:, 0].cpu())
            r["token"].append(ctx.token_ids.reshape(-1).cpu())
            r["pos"].append(ctx.positions.reshape(-1).cpu())
            r["pairs"] += out.keep_TK.numel()
            r["kept_pairs"] += int(out.keep_TK.sum())
            load = torch.bincount(out.expert_ids_TK[out.keep_TK].cpu(), minlength=E)
            r["load"] = load if r["load"] is None else r["load"] + load
            if out.probs_TE is not None:
                p = out.probs_TE.detach().float()
                r["entropy"].append((-(p * p.clamp_min(1e-20).log()).sum(-1)).cpu())
                logits_TE = router.gating(x_TD)  # eval mode: no jitter, the logits the model used
                router.train()  # routing() reads the capacity factor from the mode
                r["train_kept_pairs"] += int(router.routing(logits_TE).keep_TK.sum())
                router.eval()
            else:
                r["train_kept_pairs"] += int(out.keep_TK.sum())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def analyze(ckpt_path: str, split: str = "valid", data_prefix: str | None = None, text_file: str | None = None,
            micro_batch_size: int = 8, max_batches: int = 50, top_tokens: int = 8, skip_invalid: bool = False) -> dict:
    import torch

    from megamoe import parallel
    from megamoe.config import from_dict
    from megamoe.data.tokenizer import load_sentencepiece
    from megamoe.hf.checkpoint_reader import load_checkpoint, tokenizer_of
    from megamoe.model.gpt import build_model
    from megamoe.model.state_dict import load_full_state_dict
    from megamoe.run_config import RunConfig
    from megamoe.utils import progress
    from tools.evaluate import _dataset_batches, _text_batches

    ck = load_checkpoint(ckpt_path)
    cfg = dict(ck.config)
    cfg["parallel"] = {}
    cfg["train"] = {**(cfg.get("train") or {}), "deepspeed_config": None}
    run = from_dict(RunConfig, cfg)
    layers = run.moe.moe_layer_indices(run.model.num_layers)
    if not layers:
        raise UserError(f"{ckpt_path} is a dense model (moe.num_experts=0): there are no experts to analyse")
    if data_prefix:
        run.data.data_path = [data_prefix]
    tok_path = tokenizer_of(cfg)
    if tok_path is None:
        raise UserError("no tokenizer known: the run had no data.tokenizer_model and no dataset metadata")
    sp = load_sentencepiece(str(tok_path))
    parallel.init_cpu_parallel(run.parallel)  # the model runs on the CPU here, also on a GPU machine
    model = build_model(run.model, run.moe, run.parallel, build_tables=False)
    load_full_state_dict(model, ck.state_dict)
    model.eval()
    if text_file:
        batches = _text_batches(text_file, str(tok_path), run.data.seq_length, micro_batch_size, max_batches,
                                skip_invalid)
        source = text_file
    else:
        batches = _dataset_batches(run, split, micro_batch_size, max_batches)
        source = f"{run.data.data_path} split={split}"
    rec = _Recorder(model, layers)
    try:
        with torch.no_grad():
            for batch in progress(batches, total=max_batches, desc="analyze", unit="batch"):
                model(batch["input_ids"])
    finally:
        rec.remove()
    E, V, S = run.moe.num_experts, run.model.vocab_size, run.data.seq_length
    out = {"checkpoint": str(ckpt_path), "source": source, "num_experts": E, "layers": {}, "agreement_nmi": {}}
    first = {}
    for li in layers:
        r = rec.rec[li]
        if not r["expert"]:
            raise UserError(f"no tokens to analyse in {source}")
        ex, tk, pos = (torch.cat(r[k]) for k in ("expert", "token", "pos"))
        first[li] = ex
        load = r["load"].double() / r["load"].sum().clamp(min=1)
        counts_EV = torch.zeros(E, V, dtype=torch.float64).index_put_((ex, tk), torch.ones(len(ex), dtype=torch.float64),
                                                                     accumulate=True)
        per_token = counts_EV.sum(0).clamp(min=1)
        favourites = []
        for e in range(E):
            c, ids = counts_EV[e].topk(min(top_tokens, V))
            favourites.append([{"token": sp.id_to_piece(int(i)), "id": int(i), "count": int(n),
                                "share_of_token": round(float(n / per_token[i]), 3)} for n, i in zip(c, ids) if n > 0])
        layer = {"kind": run.moe.routing_kind(li, run.model.num_layers), "tokens": int(len(ex)),
                 "load": [round(float(x), 5) for x in load], "max_over_mean_load": round(float(load.max() * E), 4),
                 "dropped_fraction_eval": round(1 - r["kept_pairs"] / r["pairs"], 5),
                 "dropped_fraction_train_capacity": round(1 - r["train_kept_pairs"] / r["pairs"], 5),
                 "top_tokens": favourites}
        if r["entropy"]:
            ent = torch.cat(r["entropy"]).double()
            by_pos = torch.zeros(S, dtype=torch.float64).index_add_(0, pos, ent)
            n_pos = torch.bincount(pos, minlength=S).double()
            layer["router_entropy_mean"] = round(float(ent.mean()), 5)
            layer["router_entropy_by_position"] = [round(float(x), 5) for x in by_pos / n_pos.clamp(min=1)]
            layer["router_entropy_max"] = round(math.log(E), 5)
        out["layers"][str(li)] = layer
    for a in layers:
        out["agreement_nmi"][str(a)] = {str(b): round(nmi(first[a], first[b], E, E), 5) for b in layers}
    return out


def plot(res: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from megamoe.utils import atomic_path

    layers = list(res["layers"])
    names = [f"{li} ({res['layers'][li]['kind']})" for li in layers]
    written = []

    def save(fig, name):
        fig.tight_layout()
        path = out_dir / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        written.append(path)

    E = res["num_experts"]
    load = np.array([res["layers"][li]["load"] for li in layers]) * E
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * max(E, 8), 1.0 + 0.45 * len(layers)))
    im = ax.imshow(load, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(layers)), names)
    ax.set_xlabel("expert")
    ax.set_title("routed pairs per expert / uniform share (1 = balanced)", fontsize=9)
    fig.colorbar(im, ax=ax)
    save(fig, "load.png")

    nmi_m = np.array([[res["agreement_nmi"][a][b] for b in layers] for a in layers])
    fig, ax = plt.subplots(figsize=(1.6 + 0.7 * len(layers), 1.2 + 0.6 * len(layers)))
    im = ax.imshow(nmi_m, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(layers)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), names)
    for i in range(len(layers)):
        for j in range(len(layers)):
            ax.text(j, i, f"{nmi_m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if nmi_m[i, j] > 0.5 else "white")
    ax.set_title("routing agreement (NMI of first choices)", fontsize=9)
    fig.colorbar(im, ax=ax)
    save(fig, "agreement.png")

    learned = [li for li in layers if "router_entropy_by_position" in res["layers"][li]]
    if learned:
        ent = np.array([res["layers"][li]["router_entropy_by_position"] for li in learned])
        fig, ax = plt.subplots(figsize=(8, 1.0 + 0.45 * len(learned)))
        im = ax.imshow(ent, aspect="auto", cmap="cividis", vmin=0, vmax=res["layers"][learned[0]]["router_entropy_max"])
        ax.set_yticks(range(len(learned)), [f"layer {li}" for li in learned])
        ax.set_xlabel("position in sequence")
        ax.set_title("mean router entropy (nats; max = ln E)", fontsize=9)
        fig.colorbar(im, ax=ax)
        save(fig, "entropy_position.png")
    return written


@cli_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="a save_dir (with 'latest'), a global_stepN dir, or a canonical model dir/.safetensors")
    ap.add_argument("--split", default="valid", choices=["train", "valid", "test", "all"],
                    help="split of the indexed dataset (the run's data.split shares; 'all' = the whole dataset)")
    ap.add_argument("--data-prefix", default=None, help="analyse another indexed dataset (PREFIX without .bin/.idx)")
    ap.add_argument("--text-file", default=None, help="analyse a plain UTF-8 text file (paragraphs = blank lines)")
    ap.add_argument("--skip-invalid", action="store_true", help="--text-file: drop lines that are not valid UTF-8")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward pass")
    ap.add_argument("--max-batches", type=int, default=50, help="analyse at most this many batches")
    ap.add_argument("--top-tokens", type=int, default=8, help="favourite tokens listed per expert")
    ap.add_argument("--output", default=None, help="output directory (default: the checkpoint dir + /analysis)")
    args = ap.parse_args(argv)
    if args.data_prefix and args.text_file:
        raise UserError("pass either --data-prefix or --text-file, not both")
    if args.text_file and not args.skip_invalid:  # refuse a non-text file before loading any model
        from tools.evaluate import read_text_file

        read_text_file(args.text_file)
    res = analyze(args.checkpoint, args.split, args.data_prefix, args.text_file, args.micro_batch_size,
                  args.max_batches, args.top_tokens, args.skip_invalid)
    out = Path(args.output) if args.output else Path(args.checkpoint) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    from megamoe.utils import atomic_write_text

    atomic_write_text(out / "analysis.json", json.dumps(res, indent=1) + "\n")
    pngs = plot(res, out)
    print(f"\nanalysed {res['checkpoint']} on {res['source']}")
    for li, layer in res["layers"].items():
        ent = f", router entropy {layer['router_entropy_mean']:.3f} nats" if "router_entropy_mean" in layer else ""
        print(f"  layer {li} ({layer['kind']}): max/mean load {layer['max_over_mean_load']:.2f}, dropped "
              f"{layer['dropped_fraction_eval']:.3f} (eval capacity) / {layer['dropped_fraction_train_capacity']:.3f} "
              f"(train capacity){ent}")
    print(f"  wrote {out / 'analysis.json'}, " + ", ".join(p.name for p in pngs))
    return 0


if __name__ == "__main__":
    main()
