"""Routing study (issue 10): dense, widened dense, Switch top-1/top-2 and hash layers at E=16 and
E=64, with the Hash Layers paper's ablations at E=64.

    python tools/experiments/routing.py            # full study, resumable (results/experiments/routing/)
    python tools/experiments/routing.py --quick    # toy size, whole study in minutes (the test suite runs it)
    python tools/experiments/routing.py --list     # the arms and their overrides

Model (full size): a 4-block decoder, D=128, 4 heads, SwiGLU F=256 (each expert as wide as the
dense FFN), V=8000 (the demo tokenizer), sequence 128; blocks 1 and 3 are sparse in every MoE arm.
Budget: 200 steps of 16 sequences (409,600 tokens) per (arm, seed), 3 seeds, valid loss over 16
batches at the end. Sized so that both studies fit in about 3 hours of 2 CPU cores, run as two
single-threaded processes: an E=64 step costs ~1 s on one core (64 small expert GEMMs per layer
dominate, whatever F), ``dense_wide_E64`` ~4 s (a 16,384-wide FFN), a dense step ~0.4 s.

Arms and why:
- ``dense``: the same decoder without experts (active-parameter baseline, also the source of the
  embeddings that the clustered/dispersed tables cluster).
- ``dense_wide_E{E}``: the sparse blocks' FFN widened to E x F, so total parameters equal the MoE
  arm's (the parameter-matched dense upper bound; E x the active FLOPs of those blocks).
- ``switch_top1_prob``: Switch top-1 whose combine weight is the router probability (~1/E at init,
  which can hold a small Switch back); ``switch_top1_st``: the straight-through weight
  p / p.detach() of value 1 (RUCAIBox/MPO SwitchFFN, megamoe's default); ``switch_top2``: top-2
  renormalised over the two chosen (Mixtral).
  Dropped-token fractions are in the table so a weak Switch is explained, not assumed.
- ``hash_balanced`` / ``hash_random``: the paper's two best hashes of the current token.
- E=64 ablations: position (our control: expect it near dense), previous-token, bigram,
  clustered and dispersed (k-means of the seed's ``dense`` embeddings), MultiHash N=4 (random and
  balanced), and oracle-future (routes by the label: analysis only, not a method).

The paper's figures (pushshift.io Reddit, ParlAI): Switch vs Hash validation perplexity 24.00 /
24.00 at 16 experts and 23.65 / 23.16 at 64 (hash ties at 16, wins by ~2 % at 64).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import COUNTS, DATA, SPLIT, Arm, Study, main  # noqa: E402

D, F, LAYERS = 128, 256, [1, 3]

BASE = [
    "model.vocab_size=8000", f"model.hidden_size={D}", "model.num_layers=4", "model.num_heads=4",
    f"model.ffn_hidden_size={F}", "model.max_position_embeddings=128", "model.tie_embeddings=true",
    f"data.data_path=[{DATA}]", f"data.split={SPLIT}", "data.seq_length=128",
    "train.micro_batch_size=16", "train.global_batch_size=16", "train.train_steps=200",
    "train.lr=2e-3", "train.min_lr=2e-4", "train.warmup_steps=20", "train.lr_decay=cosine",
    "train.weight_decay=0.1", "train.precision=fp32", "train.zero_stage=1",
    "train.eval_interval=0", "train.eval_iters=16", "train.log_interval=1",
]
QUICK = ["model.hidden_size=32", "model.num_heads=2", "model.ffn_hidden_size=64", "data.seq_length=32",
         "model.max_position_embeddings=32", "train.micro_batch_size=4", "train.global_batch_size=4",
         "train.train_steps=6", "train.warmup_steps=1", "train.eval_iters=2"]

SWITCH = ["moe.router.top_k=1", "moe.router.capacity_factor=1.25", "moe.router.aux_loss_coef=0.01",
          "moe.router.z_loss_coef=0.001"]


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
    out = [Arm("dense", [], group="dense")]
    for E in (16, 64):
        g = f"E={E}"
        out += [
            Arm(f"dense_wide_E{E}", _wide(E), group=g, note=f"blocks 1,3: one FFN of width {E}x{F}"),
            Arm(f"switch_top1_prob_E{E}", _moe(E, False) + SWITCH + ["moe.router.combine=prob"], group=g),
            Arm(f"switch_top1_st_E{E}", _moe(E, False) + SWITCH + ["moe.router.combine=straight_through"], group=g),
            Arm(f"switch_top2_E{E}", _moe(E, False) + SWITCH[1:] + ["moe.router.top_k=2", "moe.router.combine=renormalize"], group=g),
            Arm(f"hash_balanced_E{E}", _hash(E, "balanced"), group=g),
            Arm(f"hash_random_E{E}", _hash(E, "random"), group=g),
        ]
    g = "E=64 ablations"
    out += [
        Arm("hash_position_E64", _hash(64, "position"), group=g, note="control"),
        Arm("hash_previous_E64", _hash(64, "previous"), group=g),
        Arm("hash_bigram_E64", _hash(64, "bigram"), group=g),
        Arm("hash_clustered_E64", _hash(64, "clustered"), group=g, prepare=_dense_embeddings),
        Arm("hash_dispersed_E64", _hash(64, "dispersed"), group=g, prepare=_dense_embeddings),
        Arm("multihash4_random_E64", _hash(64, "random", "moe.hash.num_hashes=4"), group=g),
        Arm("multihash4_balanced_E64", _hash(64, "balanced", "moe.hash.num_hashes=4"), group=g),
        Arm("hash_oracle_future_E64", _hash(64, "oracle_future", "moe.hash.allow_oracle=true"), group=g,
            note="analysis only: routes by the label"),
    ]
    return out


STUDY = Study(name="routing", base_overrides=BASE, quick_overrides=QUICK, arms=arms(), reference={"E=16": "switch_top1_st_E16", "E=64": "switch_top1_st_E64",
                                                           "E=64 ablations": "hash_balanced_E64"},
              describe=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    from megamoe.errors import cli_main

    cli_main(lambda: main(STUDY))()
