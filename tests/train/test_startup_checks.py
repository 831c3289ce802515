"""Start-up validation (each layout error names its fields), DeepSpeed JSON agreement, and the
pieces of the engine set-up that need no processes: LR schedule, param groups, ZeRO-3 + MoE."""

import json
import math

import pytest

from megamoe.config import ConfigError
from megamoe.errors import UserError
from megamoe.run_config import RunConfig, load_run_config
from megamoe.train.config import TrainConfig
from megamoe.train.ds_config import build_ds_config
from megamoe.train.engine import lr_lambda
from megamoe.train.layout import validate_layout


def _run(**sections):
    base = {"model": {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 64,
                      "max_position_embeddings": 64},
            "moe": {"num_experts": 4, "every": 1},
            "data": {"seq_length": 32},
            "train": {"micro_batch_size": 2, "global_batch_size": 8}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    from megamoe.config import from_dict

    return from_dict(RunConfig, base)


@pytest.mark.parametrize("sections,world,field", [
    ({"parallel": {"tensor_parallel": 2, "expert_parallel": 2}}, 2, "parallel.tensor_parallel"),  # world vs TPxEP
    ({"parallel": {"expert_parallel": 4}, "moe": {"num_experts": 4}}, 2, "parallel.tensor_parallel|parallel.expert_parallel"),
    ({"train": {"micro_batch_size": 4, "global_batch_size": 12}}, 2, "train.global_batch_size"),  # 12 % (4*2)
    ({"data": {"seq_length": 128}}, 1, "data.seq_length"),  # > max_position_embeddings
    ({"train": {"zero_stage": 3}}, 1, "train.zero_stage"),  # ZeRO-3 with MoE
])
def test_layout_errors_name_fields(sections, world, field):
    with pytest.raises(ConfigError) as e:
        validate_layout(_run(**sections), world)
    assert any(f in str(e.value) for f in field.split("|")), str(e.value)


def test_experts_vs_ep_and_vocab_vs_tokenizer():
    with pytest.raises(ConfigError, match="moe.num_experts"):
        _run(moe={"num_experts": 3}, parallel={"expert_parallel": 2})
    with pytest.raises(ConfigError, match="model.vocab_size"):
        validate_layout(_run(), 1, tokenizer_vocab=100)
    info = validate_layout(_run(), 2)
    assert info == {"dp": 2, "gas": 2, "tokens_per_step": 8 * 32}


def test_deepspeed_json_must_agree(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    t = TrainConfig(micro_batch_size=2, global_batch_size=8, deepspeed_config=str(ds))
    with pytest.raises(ConfigError) as e:
        build_ds_config(t, 2, has_moe=True)
    assert "train.micro_batch_size" in str(e.value) and "train_micro_batch_size_per_gpu" in str(e.value)
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2,
                                                                                            "overlap_comm": True}}))
    cfg = build_ds_config(t, 2, has_moe=True)
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["zero_optimization"]["overlap_comm"] is True
    ds.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        build_ds_config(t, 2, has_moe=True)
    t = TrainConfig(micro_batch_size=2, global_batch_size=8, deepspeed_config=str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match="nope.json"):
        build_ds_config(t, 2, has_moe=True)


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "configs").glob("*.yaml")):
        run = load_run_config(path)
        if run.train.deepspeed_config:
            build_ds_config(run.train, 2 // run.parallel.tensor_parallel if run.parallel.tensor_parallel <= 2 else 1,
                            has_moe=bool(run.moe.num_experts))


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_lr_schedule(decay):
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, train_steps=14, lr_decay=decay)
    f = lr_lambda(t)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    end = {"cosine": 0.1, "linear": 0.1, "constant": 1.0}[decay]
    assert math.isclose(f(14), end) and math.isclose(f(100), end)
    mid = {"cosine": 0.55, "linear": 0.55, "constant": 1.0}[decay]
    assert math.isclose(f(9), mid)


def test_param_groups_weight_decay_and_central_lr():
    import torch

    from megamoe.model.config import MoEConfig
    from megamoe.train.engine import param_groups

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(4, 2)
            self.layers = torch.nn.ModuleList([torch.nn.Module()])
            blk = self.layers[0]
            blk.attn_norm = torch.nn.LayerNorm(2)
            blk.proj = torch.nn.Linear(2, 2)
            blk.moe = torch.nn.Module()
            blk.moe.experts = torch.nn.Module()
            blk.moe.experts.central = torch.nn.Parameter(torch.zeros(2))
            blk.moe.experts.aux0 = torch.nn.Parameter(torch.zeros(2))
            blk.moe.experts.aux0.allreduce = False
            blk.moe.experts.aux0.group_name = "ep_size_1"

    moe = MoEConfig(num_experts=2, every=1)
    moe.mpo.central_lr_scale = 0.5
    t = TrainConfig(lr=1.0, weight_decay=0.1)
    m = Fake()
    groups = param_groups(m, t, moe)
    lookup = {id(p): g for g in groups for p in g["params"]}
    wd = {n: lookup[id(p)]["weight_decay"] for n, p in m.named_parameters()}
    lr = {n: lookup[id(p)]["lr"] for n, p in m.named_parameters()}
    assert wd["embed.weight"] == 0 and wd["layers.0.attn_norm.weight"] == 0 and wd["layers.0.proj.bias"] == 0
    assert wd["layers.0.proj.weight"] == 0.1 and wd["layers.0.moe.experts.aux0"] == 0.1
    assert lr["layers.0.moe.experts.central"] == 0.5 and lr["layers.0.proj.weight"] == 1.0
    moe_groups = [g for g in groups if g.get("moe")]
    assert len(moe_groups) == 1 and [id(p) for p in moe_groups[0]["params"]] == [id(m.layers[0].moe.experts.aux0)]


def test_summary_prints_a_tensorboard_command_that_runs_verbatim(monkeypatch, tmp_path):
    """make demo runs .venv/bin/python without activating the venv: the summary must name the
    venv's tensorboard then, and plain ``tensorboard`` only where it is on PATH."""
    import sys
    from pathlib import Path

    from megamoe.train.trainer import tensorboard_command

    monkeypatch.setenv("PATH", str(tmp_path))  # no tensorboard on PATH
    monkeypatch.chdir(Path(sys.executable).parent.parent.parent)
    cmd = tensorboard_command()
    assert cmd != "tensorboard" and (Path.cwd() / cmd).is_file(), cmd
    (tmp_path / "tensorboard").write_text("#!/bin/sh\n")
    (tmp_path / "tensorboard").chmod(0o755)
    assert tensorboard_command() == "tensorboard"


def test_tf32_for_fp32_training_on_cuda_unless_refused(monkeypatch):
    import torch

    from megamoe.train.config import TrainConfig
    from megamoe.train.trainer import set_matmul_precision

    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert set_matmul_precision(TrainConfig()) == "high"  # fp32, the default: TF32
    assert set_matmul_precision(TrainConfig(allow_tf32=False)) == "highest"
    assert set_matmul_precision(TrainConfig(precision="bf16")) is None
    assert calls == ["high", "highest"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert set_matmul_precision(TrainConfig()) is None
