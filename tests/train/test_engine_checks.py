"""DeepSpeed coupling check (megamoe/train/engine.py:check_deepspeed_moe) and a readable console.

- On 2 gloo ranks, a real DeepSpeed engine over a megamoe MoE model passes the check at EP=2
  (expert-DP = one rank) and EP=1 (expert-DP = both ranks), under ZeRO-2 and ZeRO-0; then each
  thing a DeepSpeed upgrade could silently change is broken on that engine in turn (the MoE
  flag, the expert-DP group, the optimizer's MoE param group, the group ZeRO reduces a
  partition over) and the check must raise naming the DeepSpeed version and the mismatch.
- ZeRO-0 fp32 clips inside the fused AdamW (``clip_inside_adamw``): at one rank, three clipped
  steps land within 1e-7 (relative) of DeepSpeed's own clip-then-step, the norm it records is
  DeepSpeed's within 1e-6 (the squares are summed in another order), and the clip is active (no
  clipping moves the parameters 100x further than that tolerance). At EP=2 on 2 ranks the
  clip norm equals one process's on the same global batch (1e-6 relative; measured bit-equal),
  where DeepSpeed's own ZeRO-0 norm (a DP mean of per-rank norms) is 8e-4 off.
- AdamW's moments exist before the first step (created when the engine is built, for a stable
  heap; at ZeRO-0 bf16, DeepSpeed's zero-gradient step at construction undone), and steps from
  them are bit-identical to torch's lazy init, at ZeRO-0/2 in fp32/bf16 and ZeRO-3 (dense).
- A short 2-rank ZeRO-2 run with two saves prints no warning more than once (the four
  "Transformer Engine and Apex are not installed" per rank and DeepSpeed's
  ``all_gather_into_tensor`` FutureWarning were the noise), and says the check ran.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tests.train.helpers import launch


def _engine(ep: int, zero: int, precision: str, init=None, experts: int = 4, **train):
    os.environ["DS_ACCELERATOR"] = "cpu"
    from megamoe import parallel
    from megamoe.config import from_dict
    from megamoe.model.gpt import build_model
    from megamoe.run_config import RunConfig
    from megamoe.train.ds_config import build_ds_config
    from megamoe.train.engine import build_engine

    run = from_dict(RunConfig, {
        "model": {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 64,
                  "max_position_embeddings": 32},
        "moe": {"num_experts": experts, "every": 1, "router": {"top_k": 1}},
        "parallel": {"expert_parallel": ep},
        "data": {"seq_length": 16},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "zero_stage": zero, "precision": precision,
                  **train}})
    layout = parallel.init_parallel(run.parallel)
    parallel.seed_everything(1)
    model = build_model(run.model, run.moe, run.parallel)
    if init is not None:  # a canonical full state dict, for the same weights in any layout
        from megamoe.model.state_dict import load_full_state_dict

        load_full_state_dict(model, init)
    if precision == "bf16":
        import torch

        model = model.to(torch.bfloat16)
    engine, _, _ = build_engine(model, run, layout, build_ds_config(run.train, layout.dp, has_moe=experts > 0))
    return engine, model, layout


def _check_then_break(rank, world, ep, zero, precision):
    import deepspeed

    from megamoe import parallel
    from megamoe.train.engine import (DeepSpeedCouplingError, _base_optimizer, check_deepspeed_moe,
                                      is_expert_param)

    engine, model, layout = _engine(ep, zero, precision)
    name = f"ep_size_{ep}"
    base = _base_optimizer(engine.optimizer)
    planned = [(g.get("name"), bool(g.get("moe")), [True] if g.get("moe") else [False]) for g in base.param_groups]
    summary = check_deepspeed_moe(engine, model, ep, planned)
    assert engine.enable_backward_allreduce  # two DP ranks: DeepSpeed must reduce the gradients
    edp = [rank] if ep == 2 else [0, 1]
    assert summary["expert_dp"] == edp and summary["dp"] == [0, 1] and summary["group"] == name
    assert summary["moe_layers"] == 2 and summary["moe_param_groups"], summary
    assert all(p.group_name == name for p in model.parameters() if is_expert_param(p))

    def must_fail(what: str):
        with pytest.raises(DeepSpeedCouplingError) as e:
            check_deepspeed_moe(engine, model, ep, planned)
        msg = str(e.value)
        assert f"DeepSpeed {deepspeed.__version__}" in msg and what in msg, msg

    engine.has_moe_layers = False
    must_fail("has_moe_layers")
    engine.has_moe_layers = True

    real = engine.expert_data_parallel_group[name]
    wrong = parallel.ep_group() if ep == 1 else parallel.dp_group()  # a group of other ranks
    engine.expert_data_parallel_group[name] = wrong
    must_fail("expert_data_parallel_group")
    engine.expert_data_parallel_group[name] = real

    moe_idx = next(i for i, g in enumerate(base.param_groups) if g.get("moe"))
    base.param_groups[moe_idx]["moe"] = False
    must_fail("param groups")
    base.param_groups[moe_idx]["moe"] = True

    bad_plan = [(n, False, flags) for n, _, flags in planned]  # experts in a group DeepSpeed would DP-average
    with pytest.raises(DeepSpeedCouplingError, match="expert params"):
        check_deepspeed_moe(engine, model, ep, bad_plan)

    reduce_over = getattr(engine.optimizer, "real_dp_process_group", None)
    assert (reduce_over is not None) == (zero > 0)
    if reduce_over is not None:
        real = reduce_over[moe_idx]
        reduce_over[moe_idx] = wrong
        must_fail("ZeRO reduces param group")
        reduce_over[moe_idx] = real
    check_deepspeed_moe(engine, model, ep, planned)  # restored: passes again


@pytest.mark.parametrize("ep,zero,precision", [(2, 2, "fp32"), (1, 2, "bf16"), (1, 0, "fp32")])
def test_deepspeed_moe_check_passes_and_catches_each_mismatch(ep, zero, precision):
    run_distributed(_check_then_break, world_size=2, args=(ep, zero, precision))


def test_megamoe_itself_calls_no_deprecated_all_gather_into_tensor():
    """megamoe/utils.py filters the FutureWarning of DeepSpeed's call; it must hide no call of ours."""
    pkg = Path(__file__).resolve().parents[2] / "megamoe"
    calls = [f"{p}:{i}" for p in pkg.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"\ball_gather_into_tensor\s*\(", line)]
    assert not calls, calls


def test_short_run_prints_each_warning_at_most_once(tiny_moe, tmp_path):
    cfg, init = tiny_moe
    rc, log = launch(cfg, 2, ["parallel.expert_parallel=2", f"train.init_from={init}", "train.train_steps=4",
                              "train.save_interval=2", f"train.save_dir={tmp_path}/ckpt",
                              f"train.log_dir={tmp_path}/logs"])
    assert rc == 0, log[-3000:]
    for noise in ("Transformer Engine and Apex are not installed", "all_gather_into_tensor"):
        assert log.count(noise) <= 1, (noise, log[-3000:])
    warnings = re.findall(r"^\S*?(?:\S+\.py:\d+: )?(\w*Warning: .*)$", log.replace("\r", "\n"), re.M)
    repeated = {w for w in warnings if warnings.count(w) > 1}
    assert not repeated, repeated
    assert "MoE layers seen" in log and "checked" in log  # the coupling check ran in a real run


def test_pyproject_bounds_deepspeed_to_the_verified_range():
    import tomllib
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    from megamoe.train.engine import VERIFIED_DEEPSPEED

    root = Path(__file__).resolve().parents[2]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("deepspeed"))
    assert SpecifierSet(spec[len("deepspeed"):]) == SpecifierSet(VERIFIED_DEEPSPEED), spec
    assert version("deepspeed") in SpecifierSet(VERIFIED_DEEPSPEED)
    pinned = [ln.split("#")[0].strip() for ln in (root / "requirements.txt").read_text().splitlines()
              if ln.startswith("deepspeed")]
    assert pinned and pinned[0].split("==")[1] in SpecifierSet(VERIFIED_DEEPSPEED), pinned


def test_mfu_peak_is_measured_in_the_training_dtype(monkeypatch):
    """The MFU denominator: a bf16 run divides by a bf16 matmul, fp32 by fp32 (megamoe/train/report.py)."""
    import torch

    from megamoe.train import report

    seen = []
    real = torch.randn

    def spy(*a, **k):
        seen.append(k.get("dtype"))
        return real(*a, **k)

    monkeypatch.setattr(torch, "randn", spy)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        seen.clear()
        assert report.measure_peak_flops(precision, n=64, reps=1) > 0
        assert seen == [dtype, dtype], (precision, seen)


def _skip_one_rank_allreduce(rank, world):
    """One DP rank at ZeRO-0: build_engine turns DeepSpeed's bucketed all-reduce off (a flatten
    and copy of every gradient for nothing). Two steps with it on and off give bit-identical
    parameters, so skipping it changes nothing but the time."""
    import torch

    params = {}
    for reduce in (False, True):
        engine, model, _ = _engine(1, 0, "fp32")
        assert engine.enable_backward_allreduce is False
        engine.enable_backward_allreduce = reduce
        x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            engine.backward(engine(x[:, :-1], x[:, 1:], None).loss)
            engine.step()
        params[reduce] = [p.detach().clone() for p in model.parameters()]
        engine.destroy()
    assert all(torch.equal(a, b) for a, b in zip(params[False], params[True]))
    assert not all(torch.equal(a, b) for a, b in zip(params[False], _engine(1, 0, "fp32")[1].parameters()))


def test_one_rank_skips_deepspeed_allreduce():
    run_distributed(_skip_one_rank_allreduce, world_size=1)


def _adamw_state_allocated_first(rank, world):
    """AdamW's moments exist, zero, at step 0, before the first step, under each DeepSpeed
    optimizer path (megamoe/train/fragments.py:ensure_optimizer_state, called by build_engine):
    ZeRO-0 fp32 on the model's params, ZeRO-2 and ZeRO-3 (dense) on DeepSpeed's flat fp32
    partitions, and ZeRO-0 bf16 on the masters of DeepSpeed's fp16/bf16 optimizer, whose
    zero-gradient step at construction is undone (step 0 again, and the masters equal to the
    bf16 weights: that step had decayed them). Two steps from this state are bit-identical to two
    steps from torch's lazy init (the state cleared), and the steps used it: no second, lazily
    created state appears beside it."""
    import torch

    from megamoe.train.fragments import _inner, flat_partitions

    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    paths = ((0, "fp32", 4), (2, "fp32", 4), (2, "bf16", 4), (3, "fp32", 0), (0, "bf16", 4))
    for zero, precision, experts in paths:
        params = {}
        for lazy in (False, True):
            engine, model, _ = _engine(1, zero, precision, experts=experts)
            opt = _inner(engine.optimizer)
            held = flat_partitions(engine.optimizer) or [p for g in opt.param_groups for p in g["params"]]
            assert held and all(torch.equal(opt.state[p]["exp_avg"], torch.zeros_like(p))
                                and torch.equal(opt.state[p]["exp_avg_sq"], torch.zeros_like(p))
                                and opt.state[p]["step"].item() == 0 for p in held), (zero, precision)
            if (zero, precision) == (0, "bf16"):  # the masters are the bf16 weights, undecayed
                pairs = [(m, p) for ms, ps in zip(engine.optimizer.fp32_groups, engine.optimizer.fp16_groups)
                         for m, p in zip(ms, ps)]
                assert len(pairs) == len(held) and all(torch.equal(m, p.float()) for m, p in pairs)
            if lazy:
                opt.state.clear()
            for _ in range(2 * engine.gradient_accumulation_steps()):
                engine.backward(engine(x[:, :-1], x[:, 1:], None).loss)
                engine.step()
            assert len(opt.state) == len(held), (zero, precision)
            assert all(opt.state[p]["step"].item() == 2 for p in held), (zero, precision)
            params[lazy] = [p.detach().clone() for p in model.parameters()]
            engine.destroy()
        assert all(torch.equal(a, b) for a, b in zip(params[False], params[True])), (zero, precision)


def test_adamw_state_is_allocated_before_the_first_step():
    run_distributed(_adamw_state_allocated_first, world_size=1)


def _clip_inside_adamw(rank, world):
    import torch
    from deepspeed.runtime.utils import clip_grad_norm_

    from megamoe.train.engine import _base_optimizer

    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(rank))
    params, norms = {}, {}
    for arm in ("fused", "deepspeed", "unclipped"):
        engine, model, _ = _engine(world, 0, "fp32", grad_clip=0.0 if arm == "unclipped" else 0.05)
        seen = norms.setdefault(arm, [])
        if arm == "deepspeed":  # DeepSpeed's own ZeRO-0 fp32 clipping, its norm kept
            engine.clip_fp32_gradients = lambda e=engine: seen.append(
                clip_grad_norm_(parameters=e.module.parameters(), max_norm=e.gradient_clipping(), mpu=e.mpu).item())
        for _ in range(3 * engine.gradient_accumulation_steps()):  # three optimizer steps
            engine.backward(engine(x[:, :-1], x[:, 1:], None).loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            if arm == "fused" and boundary:
                seen.append(engine.get_global_grad_norm())
        assert (getattr(_base_optimizer(engine.optimizer), "grad_scale", None) is not None) == (arm == "fused")
        params[arm] = torch.cat([p.detach().flatten() for p in model.parameters()])
        engine.destroy()
    assert len(norms["fused"]) == 3, norms
    for a, b in zip(norms["fused"], norms["deepspeed"]):
        assert abs(a - b) <= 1e-6 * b, norms
    assert min(norms["fused"]) > 0.05 * 2, norms  # every step clipped by >= 2x
    gap = (params["fused"] - params["deepspeed"]).abs().max().item()
    scale = params["deepspeed"].abs().max().item()
    assert gap <= 1e-7 * scale, (gap, scale)  # measured 4e-9: the last bits of the coefficient
    assert (params["unclipped"] - params["deepspeed"]).abs().max().item() > 100 * 1e-7 * scale


def test_zero0_clips_inside_adamw_like_deepspeed():
    run_distributed(_clip_inside_adamw, world_size=1)


def _clipped_zero0_steps(rank, world, out):
    """Three clipped ZeRO-0 fp32 steps at EP=world on the global batch of ranks 0 and 1 (one
    process takes both micro-batches by accumulation). Saves norms and full params to ``out``."""
    import torch
    from deepspeed.runtime.utils import clip_grad_norm_

    from megamoe.model.state_dict import gather_full_state_dict

    init = torch.load(out.parent / "init.pt") if world > 1 else None
    engine, model, _ = _engine(world, 0, "fp32", init=init, grad_clip=0.05)
    if world == 1:
        torch.save(gather_full_state_dict(model), out.parent / "init.pt")
    batches = [torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(r)) for r in range(2)]
    mine = batches if world == 1 else [batches[rank]]
    norms, deepspeed_norms = [], []
    for _ in range(3):
        for x in mine:
            engine.backward(engine(x[:, :-1], x[:, 1:], None).loss)
            if engine.is_gradient_accumulation_boundary():  # max_norm 1e9: measures, never clips
                deepspeed_norms.append(clip_grad_norm_(parameters=list(model.parameters()), max_norm=1e9,
                                                       mpu=engine.mpu).item())
            engine.step()
        norms.append(engine.get_global_grad_norm())
    full = gather_full_state_dict(model)
    if rank == 0:
        torch.save({"norms": norms, "deepspeed_norms": deepspeed_norms, "params": full}, out)
    engine.destroy()


def test_zero0_ep2_clips_like_one_process(tmp_path):
    """The clip norm at ZeRO-0 counts every expert once, so EP=2 clips by one process's norm;
    DeepSpeed's ZeRO-0 norm (the DP mean of per-rank norms) does not. The parameters are
    checked too, but cannot tell the two apart: AdamW is nearly invariant to a constant gradient
    scale (measured 4e-7 vs 7e-7 relative after 3 steps), so the norm is the assertion that
    guards the bug."""
    import torch

    run_distributed(_clipped_zero0_steps, world_size=1, args=(tmp_path / "one.pt",))
    run_distributed(_clipped_zero0_steps, world_size=2, args=(tmp_path / "ep2.pt",))
    one, ep2 = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "ep2.pt")
    assert min(one["norms"]) > 0.05 * 2, one["norms"]  # every step clipped by >= 2x
    for a, b in zip(ep2["norms"], one["norms"]):
        assert abs(a - b) <= 1e-6 * b, (ep2["norms"], one["norms"])
    assert ep2["params"].keys() == one["params"].keys()
    for k, ref in one["params"].items():
        gap = (ep2["params"][k] - ref).abs().max().item()
        assert gap <= 1e-6 * max(ref.abs().max().item(), 1e-3), (k, gap)
    # control: DeepSpeed's own ZeRO-0 norm at EP=2 misses one process's (measured 8e-4)
    off = max(abs(a - b) / b for a, b in zip(ep2["deepspeed_norms"], one["norms"]))
    assert off > 1e-4, (ep2["deepspeed_norms"], one["norms"])


def _aligned_engine(rank, world, zero, ordered, out):
    """bf16 engine over hash-layer MPO experts (cores of odd sizes) beside FFN experts, 3 experts
    (an odd local count); writes the misaligned expert weights found after initialize."""
    import json

    import torch

    os.environ["DS_ACCELERATOR"] = "cpu"
    from megamoe import parallel
    from megamoe.config import from_dict
    from megamoe.model.gpt import build_model
    from megamoe.moe.experts import misaligned_expert_weights
    from megamoe.run_config import RunConfig
    from megamoe.train import engine as engine_mod
    from megamoe.train.ds_config import build_ds_config

    run = from_dict(RunConfig, {
        "model": {"vocab_size": 64, "hidden_size": 32, "num_layers": 3, "num_heads": 4, "ffn_hidden_size": 64,
                  "max_position_embeddings": 32},
        "moe": {"num_experts": 3, "layers": [1, 2], "hash_layers": [0],
                "hash": {"variant": "random", "expert_type": "mpo"},
                "mpo": {"num_tensors": 3, "input_shape": [2, 2, 8], "output_shape": [2, 4, 8], "max_bond_dim": 3}},
        "data": {"seq_length": 16},
        "train": {"micro_batch_size": 2, "global_batch_size": 2, "zero_stage": zero, "precision": "bf16"}})
    layout = parallel.init_parallel(run.parallel)
    model = build_model(run.model, run.moe, run.parallel).to(torch.bfloat16)
    odd = [n for n, p in model.named_parameters() if p.numel() % 8]
    if not ordered:  # what DeepSpeed packs without megamoe's ordering
        original = engine_mod.param_groups
        engine_mod.param_groups = lambda *a: [{**g, "params": sorted(g["params"], key=lambda p: p.numel() % 8 == 0)}
                                              for g in original(*a)]
        engine_mod.misaligned_expert_weights = lambda *a: []  # let it build, to count what it finds
    engine, _, _ = engine_mod.build_engine(model, run, layout, build_ds_config(run.train, layout.dp, has_moe=True))
    Path(out).write_text(json.dumps({"odd": odd, "bad": misaligned_expert_weights(engine.module, torch.bfloat16)}))


@pytest.mark.parametrize("zero", [1, 2])
def test_expert_weights_16_byte_aligned_in_deepspeed_bf16_buffers(tmp_path, zero):
    """After ``deepspeed.initialize`` in bf16 at ZeRO-1/2 every FFN expert weight starts on a 16-byte
    boundary, as ``torch._grouped_mm`` requires on CUDA (the CPU kernel does not check). The
    control packs the odd-sized MPO cores first, as DeepSpeed would without megamoe's ordering of
    each param group, and the FFN expert weights after them misalign: the check has teeth."""
    import json

    results = {}
    for ordered in (True, False):
        out = tmp_path / f"{zero}_{ordered}.json"
        run_distributed(_aligned_engine, world_size=1, args=(zero, ordered, str(out)))
        results[ordered] = json.loads(out.read_text())
    assert results[True]["odd"], "the model must hold parameters of odd sizes"
    assert results[True]["bad"] == []
    assert results[False]["bad"], "control: without the ordering some expert weight must misalign"
