"""Routing study (issue 31, the Hash Layers figure): dense, dense widened to equal total
parameters, tuned dropless Switch, and balanced / random hash layers at E = 8, 16, 32, 64, 128;
Switch variants (top-2 dropless, capacity 1.25 at train and eval) at E=16 and 64; the Hash Layers
paper's ablations at E=64; and a larger scale at E=16 and 64.

    python tools/experiments/routing.py                # full study, resumable (results/experiments/routing/)
    python tools/experiments/routing.py --report-only  # the tables and plots from the cache; stale results marked
    python tools/experiments/routing.py --rerun-stale  # retrain results made by other code or config
    python tools/experiments/routing.py --quick        # toy size (the test suite runs a subset of the arms)
    python tools/experiments/routing.py --list         # the arms and their overrides

Model (full size): a 4-block decoder, D=128, 4 heads, SwiGLU F=256 (each expert as wide as the
dense FFN), V=8000 (the demo tokenizer), sequence 128; blocks 1 and 3 are sparse in every MoE arm.
Budget: 400 steps of 16 sequences (819,200 tokens) per (arm, seed); valid loss over 32 batches
(LR selection), test loss over 32 (512 of the 5 % test split's 547 sequences; every comparison). Seeds: 5 for
the headline groups (dense, E=16, E=64), 3 elsewhere. Larger scale ("L"): D=256, 8 heads,
F=512, 800 steps (2x width, 2x tokens), 3 seeds, at the LRs swept at the small scale (no budget
for a sweep of its own: a limitation). Why 400 steps and not the first design's 200, and the
cost: docs/studies.md#sizes-and-cost.

Arms and why:
- ``dense``: the same decoder without experts (active-parameter baseline, also the source of the
  embeddings that the clustered/dispersed tables cluster).
- ``dense_wide_E{E}``: the sparse blocks' FFN widened to E x F, so total parameters equal the MoE
  arm's (the parameter-matched dense upper bound; E x the active FLOPs of those blocks).
- ``switch_top1_E{E}``: the tuned baseline: Switch top-1, dropless (no capacity at train or
  eval), aux loss 0.01, z-loss 0.001, the Switch Transformer's combine weight p (the expert's
  output scaled by its router probability). ``switch_st_E{E}`` (E=16, 64): megamoe's default
  straight-through weight p / p.detach() of value 1 (RUCAIBox/MPO's SwitchFFN) instead; a
  one-seed pilot at E=16 and 800 steps had it 0.052 nats worse on valid, so the baseline uses p
  and this arm measures the gap. ``switch_top2_E{E}``: top-2 dropless, renormalised (Mixtral).
  ``switch_cap1.25_E{E}``: top-1 at capacity 1.25 in training AND evaluation (the 2026-12-02
  study trained at 1.25 and evaluated at 2.0).
- ``hash_balanced`` / ``hash_random``: the paper's two best hashes of the current token.
- E=64 ablations: position (our control: expect it near dense), previous-token, bigram,
  clustered and dispersed (k-means of the seed's ``dense`` embeddings), MultiHash N=4 (random and
  balanced), and oracle-future (routes by the label: analysis only, not a method; no verdict).
- LR: each family (dense, dense_wide, switch, hash) takes the best of 1.5e-3 / 3e-3 / 6e-3 on
  valid at one seed of its own, swept at E=16 (at 200 steps every family chose 3e-3 of 1e-3 / 3e-3
  / 9e-3, and 9e-3 was far worse).
- Widened dense: 3 seeds at every E (the costliest arms, and a bound rather than a headline).

The paper's figures (pushshift.io Reddit, ParlAI): Switch vs Hash validation perplexity 24.00 /
24.00 at 16 experts and 23.65 / 23.16 at 64 (hash ties at 16, wins by ~2 % at 64).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import COUNTS, DATA, SPLIT, Arm, Study, main  # noqa: E402

D, F, LAYERS = 128, 256, [1, 3]
STEPS = 400  # 819,200 tokens; why not 200: docs/studies.md#sizes-and-cost

BASE = [
    "model.vocab_size=8000", f"model.hidden_size={D}", "model.num_layers=4", "model.num_heads=4",
    f"model.ffn_hidden_size={F}", "model.max_position_embeddings=128", "model.tie_embeddings=true",
    f"data.data_path=[{DATA}]", f"data.split={SPLIT}", "data.seq_length=128",
    "train.micro_batch_size=16", "train.global_batch_size=16", f"train.train_steps={STEPS}",
    "train.lr=2e-3", "train.min_lr=2e-4", f"train.warmup_steps={STEPS // 10}", "train.lr_decay=cosine",
    "train.weight_decay=0.1", "train.precision=fp32", "train.zero_stage=1",
    "train.eval_interval=0", "train.eval_iters=32", "train.log_interval=1",
]
QUICK = ["model.hidden_size=32", "model.num_heads=2", "model.ffn_hidden_size=64", "data.seq_length=32",
         "model.max_position_embeddings=32", "train.micro_batch_size=4", "train.global_batch_size=4",
         "train.train_steps=6", "train.warmup_steps=1", "train.eval_iters=2"]

LADDER, HEADLINE = (8, 16, 32, 64, 128), (16, 64)
LR_GRID = (1.5e-3, 3e-3, 6e-3)  # at 200 steps every family chose 3e-3 of 1e-3/3e-3/9e-3: refined around it
SHORT = 3  # seeds outside the headline groups
LARGE = ["model.hidden_size=256", "model.num_heads=8", "model.ffn_hidden_size=512",
         f"train.train_steps={2 * STEPS}", f"train.warmup_steps={2 * STEPS // 10}"]

# dropless Switch (no capacity in training or evaluation), the Switch Transformer's combine weight p
# (chosen on valid over megamoe's default straight-through: docs/studies.md#sizes-and-cost)
SWITCH = ["moe.router.top_k=1", "moe.router.capacity_factor=0", "moe.router.eval_capacity_factor=0",
          "moe.router.aux_loss_coef=0.01", "moe.router.z_loss_coef=0.001", "moe.router.combine=prob"]


def _moe(E: int, hashed: bool) -> list[str]:
    if hashed:
        return [f"moe.num_experts={E}", "moe.layers=[]", f"moe.hash_layers={LAYERS}".replace(" ", "")]
    return [f"moe.num_experts={E}", f"moe.layers={LAYERS}".replace(" ", "")]


def _wide(E: int) -> list[str]:
    """A dense FFN of width E x F in the sparse blocks, as a one-expert dropless MoE: with one
    expert the router's softmax is exactly 1, so the block computes x + FFN_wide(norm(x)) and its
    total parameters equal the E-expert arm's (plus one D-vector of router weights)."""
    return ["moe.num_experts=1", f"moe.layers={LAYERS}".replace(" ", ""), f"moe.expert_ffn_hidden_size={E * F}",
            "moe.router.capacity_factor=0", "moe.router.eval_capacity_factor=0", "moe.router.aux_loss_coef=0",
            "moe.router.z_loss_coef=0"]


def _hash(E: int, variant: str, *extra: str) -> list[str]:
    out = _moe(E, True) + [f"moe.hash.variant={variant}", *extra]
    if variant == "balanced":
        out.append(f"moe.hash.counts_file={COUNTS}")
    return out


def _dense_embeddings(arm, seed, run_dir, overrides) -> list[str]:
    """clustered/dispersed cluster the embeddings of this seed's trained ``dense`` arm."""
    found = sorted((run_dir.parent.parent / "dense" / f"seed{seed}.run" / "checkpoints").glob("global_step*/model.safetensors"))
    if not found:
        from megamoe.errors import UserError

        raise UserError(f"arm {arm.name}: run the 'dense' arm for seed {seed} first (its embeddings are clustered)")
    return [f"moe.hash.embedding_checkpoint={found[-1]}"]


def arms() -> list[Arm]:
    out = [Arm("dense", [], group="dense", family="dense")]
    for E in LADDER:
        g, n = f"E={E}", (0 if E in HEADLINE else SHORT)
        out += [
            Arm(f"dense_wide_E{E}", _wide(E), group=g, note=f"blocks 1,3: one FFN of width {E}x{F}",
                family="dense_wide", seeds=SHORT),  # a bound, not a headline arm: 3 seeds (it is the costliest)
            Arm(f"switch_top1_E{E}", _moe(E, False) + SWITCH, group=g, family="switch", seeds=n, note="dropless"),
        ]
        if E in HEADLINE:
            out += [
                Arm(f"switch_top2_E{E}", _moe(E, False) + SWITCH + ["moe.router.top_k=2", "moe.router.combine=renormalize"],
                    group=g, family="switch", note="dropless"),
                Arm(f"switch_cap1.25_E{E}", _moe(E, False) + SWITCH + ["moe.router.capacity_factor=1.25",
                                                                       "moe.router.eval_capacity_factor=1.25"],
                    group=g, family="switch", note="capacity 1.25 in training and eval"),
                Arm(f"switch_st_E{E}", _moe(E, False) + SWITCH + ["moe.router.combine=straight_through"],
                    group=g, family="switch", seeds=SHORT, note="megamoe's default combine weight"),
            ]
        out += [Arm(f"hash_balanced_E{E}", _hash(E, "balanced"), group=g, family="hash", seeds=n),
                Arm(f"hash_random_E{E}", _hash(E, "random"), group=g, family="hash", seeds=n)]
    g = "E=64 ablations"
    abl = dict(group=g, family="hash", seeds=SHORT)
    out += [
        Arm("hash_position_E64", _hash(64, "position"), note="control", **abl),
        Arm("hash_previous_E64", _hash(64, "previous"), **abl),
        Arm("hash_bigram_E64", _hash(64, "bigram"), **abl),
        Arm("hash_clustered_E64", _hash(64, "clustered"), prepare=_dense_embeddings, **abl),
        Arm("hash_dispersed_E64", _hash(64, "dispersed"), prepare=_dense_embeddings, **abl),
        Arm("multihash4_random_E64", _hash(64, "random", "moe.hash.num_hashes=4"), **abl),
        Arm("multihash4_balanced_E64", _hash(64, "balanced", "moe.hash.num_hashes=4"), **abl),
        Arm("hash_oracle_future_E64", _hash(64, "oracle_future", "moe.hash.allow_oracle=true"), group="oracle",
            family="hash", seeds=SHORT, note="analysis only: routes by the label"),
    ]
    out.append(Arm("dense_L", LARGE, group="L: dense", family="dense", seeds=SHORT, note="2x width, 2x tokens"))
    for E in HEADLINE:
        g = f"L: E={E}"
        out += [Arm(f"switch_top1_L_E{E}", LARGE + _moe(E, False) + SWITCH, group=g, family="switch", seeds=SHORT),
                Arm(f"hash_balanced_L_E{E}", LARGE + _hash(E, "balanced"), group=g, family="hash", seeds=SHORT)]
    return out


def ladder(study, rows: list[dict], out) -> str:
    """The Hash Layers figure: test perplexity against E for each method (95 % intervals), as
    ``e_ladder.png`` and a table (E across, methods down)."""
    import math

    from common import plot_test_ppl

    by = {r["arm"]: r for r in rows if "test_ppl" in r}
    methods = {"dense_wide": "dense widened (equal total params)", "switch_top1": "Switch top-1, dropless",
               "hash_balanced": "hash, balanced", "hash_random": "hash, random"}
    pts = {label: [(E, by[f"{key}_E{E}"]) for E in LADDER if f"{key}_E{E}" in by] for key, label in methods.items()}
    err = lambda r, side: abs(math.exp(r[side]) - r["test_ppl"]) if math.isfinite(r[side]) else 0.0  # noqa: E731

    def draw(ax):
        for label, p in pts.items():
            if p:
                ax.errorbar([E for E, _ in p], [r["test_ppl"] for _, r in p], marker="o", capsize=3, label=label,
                            yerr=[[err(r, "test_lm_loss_lo") for _, r in p], [err(r, "test_lm_loss_hi") for _, r in p]])

    dense = by.get("dense", {}).get("test_ppl")
    plot_test_ppl(out / "e_ladder.png", "experts E (blocks 1 and 3)", draw, dense, log_base=2)
    table = ["", "## Test perplexity against the number of experts", "",
             "| method | " + " | ".join(f"E={E}" for E in LADDER) + " |", "|---|" + "---|" * len(LADDER)]
    for label, p in pts.items():
        cells = {E: f"{r['test_ppl']:.1f}" for E, r in p}
        table.append(f"| {label} | " + " | ".join(cells.get(E, "") for E in LADDER) + " |")
    if dense is not None:
        table.append(f"| dense (no experts) | {dense:.1f} (every E) |" + " |" * (len(LADDER) - 1))
    return "\n".join(table + ["", "![test perplexity against E](e_ladder.png)", ""])


STUDY = Study(name="routing", base_overrides=BASE, quick_overrides=QUICK, arms=arms(),
              reference={**{f"E={E}": f"switch_top1_E{E}" for E in LADDER}, "E=64 ablations": "hash_balanced_E64",
                         **{f"L: E={E}": f"switch_top1_L_E{E}" for E in HEADLINE}},
              lr_sweep={"dense": "dense", "dense_wide": "dense_wide_E16", "switch": "switch_top1_E16",
                        "hash": "hash_balanced_E16"},
              lr_grid=LR_GRID, figures=ladder, describe=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    from megamoe.errors import cli_main

    cli_main(lambda: main(STUDY))()
