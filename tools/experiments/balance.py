"""Balance study (issue 12 item 7): the Switch auxiliary loss, aux-loss-free expert bias, and both,
at E=16 and E=64, with validation perplexity and the max/mean expert load over training.

    python tools/experiments/balance.py            # full study, resumable (results/experiments/balance/)
    python tools/experiments/balance.py --quick    # toy size (the test suite runs it)

Model and budget: the routing study's (tools/experiments/routing.py: 4 blocks, D=128, F=256,
V=8000, sequence 128, blocks 1 and 3 sparse, 400 steps of 16 sequences, the 90/5/5 split, test
loss compared), 3 seeds (not a headline study), routing's Switch top-1 (combine weight p) with
capacity factor 1.25 in training and evaluation in every arm (balance matters where
tokens are dropped), so only the balancing rule differs; one LR per family (Switch, hash), the
best of routing's grid on valid at a seed of its own:
- ``aux``: the micro-batch Switch loss, coefficient 0.01.
- ``bias``: no aux loss; the DeepSeek-V3 selection bias moved by ``rate * sign(mean - load)``
  after each step, rate 1e-3 (Megatron-Core's ``moe_router_bias_update_rate`` default).
- ``aux_bias``: both.
The z-loss (0.001) stays on in every arm. ``max/mean load`` is the busiest expert's share of the
routed tokens over the mean share, before capacity drops: 1 is perfect balance.

Router losses without drops (issue 31: does the learned router lose to dense because of its
losses?), dropless E=16, against routing's baseline (``switch_top1_E16``: aux 0.01, z 0.001):
- ``dropless_aux_E16``: that baseline, rerun here so the comparison is paired within one study;
- ``dropless_no_losses_E16``: no aux loss, no z-loss (the MPOE official code's router);
- ``dropless_bias_E16``: the expert bias instead of the aux loss, z-loss kept.
They take the Switch family's LR (swept on ``aux_E16``: the same router, only drops differ).

Hash-MoE (DeepSeek-V4, megamoe/moe/hash_moe.py) against the Hash Layers paper's hash layer at
E=64, balanced tables, equal active parameters:
- ``hash_layer_E64``: top-1 by the token id, weight 1 (routing's ``hash_balanced_E64``);
- ``hash_moe_k2_E64``: k=2 experts per token id from the frozen [V, 2] table, each half as wide
  (F/2), weighted by the learned gate's normalised sqrt(softplus) scores (DeepSeek-V4's scoring);
- ``hash_moe_k2_shared_E64``: the same with experts of width F/4 plus one always-on shared expert
  of width F/2 (DeepSeek-V4 keeps a shared expert beside its hash-routed ones).
Fine-grained arms keep total expert parameters per layer at half and a quarter of the hash
layer's, so a hash-MoE win is not bought with parameters.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Arm, Study, main  # noqa: E402
from routing import BASE, COUNTS, F, LR_GRID, QUICK, SWITCH, _hash, _moe  # noqa: E402

BIAS_RATE = 1e-3


def arms() -> list[Arm]:
    out = []
    for E in (16, 64):
        switch = _moe(E, False) + SWITCH + ["moe.router.capacity_factor=1.25", "moe.router.eval_capacity_factor=1.25"]
        bias = [f"moe.router.expert_bias_rate={BIAS_RATE}"]
        g = f"E={E}"
        out += [
            Arm(f"aux_E{E}", switch, group=g, note="aux 0.01", family="switch"),
            Arm(f"bias_E{E}", switch + ["moe.router.aux_loss_coef=0"] + bias, group=g, note=f"bias rate {BIAS_RATE}",
                family="switch"),
            Arm(f"aux_bias_E{E}", switch + bias, group=g, note="both", family="switch"),
        ]
    dropless = _moe(16, False) + SWITCH
    g = "router losses, dropless E=16"
    out += [
        Arm("dropless_aux_E16", dropless, group=g, note="routing's baseline", family="switch"),
        Arm("dropless_no_losses_E16", dropless + ["moe.router.aux_loss_coef=0", "moe.router.z_loss_coef=0"], group=g,
            note="no aux, no z", family="switch"),
        Arm("dropless_bias_E16", dropless + ["moe.router.aux_loss_coef=0", f"moe.router.expert_bias_rate={BIAS_RATE}"],
            group=g, note=f"bias rate {BIAS_RATE}, z kept", family="switch"),
    ]
    hash_moe = _moe(64, False) + ["moe.hash_moe.layers=2", "moe.hash_moe.variant=balanced",
                                  f"moe.hash_moe.counts_file={COUNTS}", "moe.router.top_k=2",
                                  "moe.router.scoring=sqrtsoftplus", "moe.router.capacity_factor=1.25",
                                  "moe.router.aux_loss_coef=0", "moe.router.z_loss_coef=0"]
    g = "hash-MoE vs hash layer, E=64"
    out += [
        Arm("hash_layer_E64", _hash(64, "balanced"), group=g, note="paper's hash layer", family="hash"),
        Arm("hash_moe_k2_E64", hash_moe + [f"moe.expert_ffn_hidden_size={F // 2}"], group=g, note="k=2 x F/2",
            family="hash"),
        Arm("hash_moe_k2_shared_E64", hash_moe + [f"moe.expert_ffn_hidden_size={F // 4}", "moe.shared_experts=1",
                                                  f"moe.shared_expert_ffn_hidden_size={F // 2}"], group=g,
            note="k=2 x F/4 + shared F/2", family="hash"),
    ]
    return out


STUDY = Study(name="balance", base_overrides=BASE, quick_overrides=QUICK, arms=arms(), seeds=3,
              reference={"E=16": "aux_E16", "E=64": "aux_E64", "router losses, dropless E=16": "dropless_aux_E16",
                         "hash-MoE vs hash layer, E=64": "hash_layer_E64"},
              lr_sweep={"switch": "aux_E16", "hash": "hash_layer_E64"}, lr_grid=LR_GRID,
              describe=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    from megamoe.errors import cli_main

    cli_main(lambda: main(STUDY))()
