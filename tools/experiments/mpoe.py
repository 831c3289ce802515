"""MPOE study (issue 10): upcycle a dense base pretrained in the suite into E=8 experts (Switch
copies + noise, MPO exact, MPO bond-truncated) against continuing the dense model, at equal
steps; the central-tensor update-rule ablation on MPO exact; and MPO vs Switch from scratch.

    python tools/experiments/mpoe.py            # full study, resumable (results/experiments/mpoe/)
    python tools/experiments/mpoe.py --quick    # toy size (the test suite runs it)

Model (full size): the routing study's decoder (4 blocks, D=128, F=256, V=8000, sequence 128);
blocks 1 and 3 become MoE with E=8, top-1, straight-through combine weight p/p.detach() (as the
official RUCAIBox/MPO SwitchFFN), so an upcycled model starts as the dense model. Budget:
``dense_base`` trains 150 steps of 16 sequences per seed; every upcycled / continued arm trains
150 more steps from that seed's base (equal steps); the from-scratch arms train 300 steps.
MPO: 3 local tensors per matrix; "truncated" caps the bond dimension at 16.

Mask ablation (on MPO exact, upcycled; its no-mask reference is ``mpo_exact_upcycled``): the paper's rule (MPOE figure: with probability
p_b = 0.5 per step only the auxiliary tensors are updated, the central tensor and its AdamW
state untouched); an element-wise Bernoulli(0.5) gradient mask; a central LR x 0.5 control
(the same expected central step as the skip rule, without the skipping); freeze.

The paper's headline: Switch-level quality with 27.2x fewer total parameters (T5 upcycling and
GLUE fine-tuning, not pretraining from scratch as here).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Arm, Study, main  # noqa: E402
from routing import BASE, QUICK  # noqa: E402

E, LAYERS, BASE_STEPS, MORE_STEPS = 8, "[1,3]", 150, 150

MOE = [f"moe.num_experts={E}", f"moe.layers={LAYERS}", "moe.router.top_k=1", "moe.router.capacity_factor=1.25",
       "moe.router.combine=straight_through", "moe.mpo.num_tensors=3"]
MPO = MOE + ["moe.expert_type=mpo"]
CONTINUE = [f"train.train_steps={MORE_STEPS}", "train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=10"]
QUICK_STEPS = 4


def _base_weights(run_dir: Path, seed: int) -> Path:
    found = sorted((run_dir.parent.parent / "dense_base" / f"seed{seed}.run" / "checkpoints")
                   .glob("global_step*/model.safetensors"))
    if not found:
        from megamoe.errors import UserError

        raise UserError(f"run the 'dense_base' arm for seed {seed} first (the upcycled arms start from it)")
    return found[-1]


def _from_base(upcycle: bool):
    """prepare(): this seed's dense base, upcycled into the arm's MoE config when ``upcycle``."""

    def prepare(arm, seed, run_dir, overrides):
        base = _base_weights(run_dir, seed)
        if not upcycle:
            return [f"train.init_from={base}"]
        from safetensors.torch import load_file, save_file

        from megamoe.hf.import_ import upcycle as upcycle_sd
        from megamoe.run_config import load_run_config
        from megamoe.utils import atomic_path

        run = load_run_config(None, overrides)
        out = run_dir / "upcycled.safetensors"
        if not out.is_file():
            sd = upcycle_sd(run.model, run.moe, load_file(str(base)), noise=0.01, seed=1000 + seed)
            with atomic_path(out) as tmp:
                save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
        return [f"train.init_from={out}"]

    return prepare


def arms() -> list[Arm]:
    more = CONTINUE
    scratch = [f"train.train_steps={BASE_STEPS + MORE_STEPS}"]
    up = _from_base(True)
    g, m, s = "upcycled E=8", "mask ablation (MPO exact, upcycled)", "from scratch E=8"
    return [
        Arm("dense_base", [f"train.train_steps={BASE_STEPS}"], group="base", note="the dense model every arm starts from"),
        Arm("dense_continued", more, group=g, prepare=_from_base(False)),
        Arm("switch_upcycled", MOE + more, group=g, prepare=up, note="copies + 1% noise"),
        Arm("mpo_exact_upcycled", MPO + more, group=g, prepare=up),
        Arm("mpo_trunc16_upcycled", MPO + ["moe.mpo.max_bond_dim=16"] + more, group=g, prepare=up),
        Arm("mask_skip_p0.5", MPO + ["moe.mpo.grad_mask=skip", "moe.mpo.grad_mask_p=0.5"] + more, group=m, prepare=up,
            note="paper's rule"),
        Arm("mask_bernoulli_0.5", MPO + ["moe.mpo.grad_mask=bernoulli", "moe.mpo.grad_mask_p=0.5"] + more, group=m,
            prepare=up, note="element-wise"),
        Arm("central_lr_x0.5", MPO + ["moe.mpo.central_lr_scale=0.5"] + more, group=m, prepare=up,
            note="LR-matched control"),
        Arm("mask_freeze", MPO + ["moe.mpo.grad_mask=freeze"] + more, group=m, prepare=up),
        Arm("switch_scratch", MOE + scratch, group=s),
        Arm("mpo_scratch", MPO + scratch, group=s),
    ]


STUDY = Study(name="mpoe", base_overrides=BASE, arms=arms(), describe=__doc__.split("\n\n")[0],
              quick_overrides=QUICK + [f"train.train_steps={QUICK_STEPS}"],
              reference={"upcycled E=8": "switch_upcycled", "mask ablation (MPO exact, upcycled)": "mpo_exact_upcycled",
                         "from scratch E=8": "switch_scratch"})

if __name__ == "__main__":
    from megamoe.errors import cli_main

    cli_main(lambda: main(STUDY))()
