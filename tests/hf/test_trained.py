"""Checkpoints trained a few steps by pretrain/pretrain_moe.py under expert parallelism (EP=2)
and tensor parallelism (TP=2) export to HF models that equal the native model: logits
(max |diff| <= 1e-4, fp32), 20 greedy tokens, and loss on validation-split tokens.

Runs (~20-30 s each on 2 busy cores):
- EP=2: block 0 hash (balanced, from the dataset's unigram counts), blocks 1-2 Switch top-1 with
  MPO experts (the training tests' tiny model) -> megamoe;
- TP=2: a Mixtral made with transformers, imported by convert_from_hf and trained on from its
  weights (train.init_from) -> Mixtral (TP-sharded expert widths merged back exactly);
- DP=2, ZeRO-3, bf16, dense -> Llama, from the fp32 master weights in the checkpoint's shards
  (not the bf16 module copies);
- TP=2, gated shared experts, top-2, block 0 dense -> Qwen2-MoE; EP=2, an ungated shared expert
  in the hash and MPO Switch blocks -> megamoe (10 steps at lr 1e-2 each);
- EP=2, GELU, block 2 dense -> megamoe: 10 steps at lr 1e-2 grow the pre-activations enough
  that exact-vs-tanh GELU shows in the logits (measured 2.5e-5, against 3.6e-7 with the right
  GELU), so check_parity's 5e-6 sees a wrong dense GELU (test_parity_sees_a_wrong_dense_gelu;
  at init scale the difference is ~1e-8).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.hf.test_parity import check_parity
from tests.train.helpers import launch, make_dataset, tiny_config, write_config

RUNS = {
    "ep2_hash_switch_mpo": ({"parallel.expert_parallel": 2}, None, "MegamoeForCausalLM"),
    "tp2_imported_mixtral": ({"parallel.tensor_parallel": 2, "train.lr": 1e-4, "train.min_lr": 1e-5},
                             "import", "MixtralForCausalLM"),
    "dp2_zero3_bf16_dense": ({"train.zero_stage": 3, "train.precision": "bf16"}, "dense", "LlamaForCausalLM"),
    "ep2_gelu_dense_block": ({"parallel.expert_parallel": 2, "model.activation": "gelu", "moe.layers": [1],
                              "train.lr": 1e-2, "train.min_lr": 1e-3, "train.train_steps": 10}, "gelu",
                             "MegamoeForCausalLM"),
    # Qwen2-MoE: dense block 0, top-2 SwiGLU experts + 2 gated shared experts of width 16 (TP-sharded)
    "tp2_shared_gated_qwen2": ({"parallel.tensor_parallel": 2, "moe.hash_layers": [], "moe.expert_type": "ffn",
                                "moe.router.top_k": 2, "moe.shared_experts": 2, "moe.shared_expert_ffn_hidden_size": 16,
                                "moe.shared_expert_gate": True, "train.lr": 1e-2, "train.min_lr": 1e-3,
                                "train.train_steps": 10}, "shared", "Qwen2MoeForCausalLM"),
    # an ungated shared expert beside the random hash layer and the MPO Switch layers -> megamoe
    "ep2_shared_ungated_hash_mpo": ({"parallel.expert_parallel": 2, "moe.shared_experts": 1, "train.lr": 1e-2,
                                     "train.min_lr": 1e-3, "train.train_steps": 10}, "shared", "MegamoeForCausalLM"),
}


def import_mixtral(out):
    """A transformers Mixtral (random init) -> convert_from_hf; returns the model/moe sections and
    train.init_from of the written megamoe_config.yaml, ready to merge into a run config."""
    import yaml
    from tools import convert_from_hf
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)).save_pretrained(out / "src")
    with pytest.raises(SystemExit) as e:
        convert_from_hf.main(["--hf-dir", str(out / "src"), "--output", str(out / "mm")])
    assert e.value.code == 0
    run = yaml.safe_load((out / "mm" / "megamoe_config.yaml").read_text())
    return {"model": run["model"], "moe": run["moe"]}, run["train"]["init_from"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import numpy as np

    root = tmp_path_factory.mktemp("trained")
    prefix, tok = make_dataset(root / "data")
    out = {}
    for name, (over, moe, _) in RUNS.items():
        cfg = tiny_config(prefix, tok, root / name, moe=moe != "dense", **{"train.train_steps": 3, **over})
        if moe == "import":
            sections, init_from = import_mixtral(root / "mixtral")
            cfg.update(sections)
            cfg["train"]["init_from"] = init_from
        elif moe is None:
            counts = np.bincount(np.fromfile(f"{prefix}.bin", dtype=np.int32), minlength=64)
            np.save(root / "counts.npy", counts)
            cfg["moe"]["hash"] = {"variant": "balanced", "counts_file": str(root / "counts.npy")}
        rc, log = launch(write_config(cfg, root / f"{name}.yaml"), 2, timeout=600)
        assert rc == 0, log[-3000:]
        out[name] = (root / name, prefix)
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_trained_checkpoint_exports_exactly(trained, name, tmp_path):
    import numpy as np
    from tools import convert_to_hf
    from transformers import AutoModelForCausalLM

    import megamoe.hf  # noqa: F401
    from megamoe.hf.checkpoint_reader import load_checkpoint, model_configs
    from megamoe.model.state_dict import load_full_state_dict
    from tests.hf.common import build_native

    run_dir, prefix = trained[name]
    with pytest.raises(SystemExit) as e:
        convert_to_hf.main(["--checkpoint", str(run_dir / "ckpt"), "--output", str(tmp_path / "hf")])
    assert e.value.code == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == RUNS[name][2]
    ck = load_checkpoint(run_dir / "ckpt")
    native = build_native(*model_configs(ck.config))
    load_full_state_dict(native, ck.state_dict)
    check_parity(native, hf)
    # loss on real (validation-split end of the corpus) token sequences
    tokens = torch.from_numpy(np.fromfile(f"{prefix}.bin", dtype=np.int32)[-4 * 33:].astype(np.int64)).view(4, 33)
    with torch.no_grad():
        ref = native(tokens[:, :-1], labels=tokens[:, 1:]).lm_loss.item()
        got = hf(tokens, labels=tokens).loss.item()
    assert abs(ref - got) <= 1e-5, (ref, got)
    logged = [json.loads(l) for l in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in logged if r.get("split") == "valid"][-1]
    assert f"final validation loss {valid['lm_loss']:.4f}" in (tmp_path / "hf" / "README.md").read_text()


def test_bf16_zero3_checkpoint_exports_fp32_masters(trained):
    """ZeRO-3 bf16: the export reads the fp32 masters from the shards (the bf16 module copies are
    not even saved), equal to the checkpoint's consolidated model.safetensors."""
    from safetensors.torch import load_file

    from megamoe.hf.checkpoint_reader import load_checkpoint

    run_dir, _ = trained["dp2_zero3_bf16_dense"]
    ck = load_checkpoint(run_dir / "ckpt")
    full = load_file(str(run_dir / "ckpt" / "global_step3" / "model.safetensors"))
    assert sorted(full) == sorted(ck.state_dict)
    for k, v in full.items():
        assert v.dtype == torch.float32 and torch.equal(ck.state_dict[k], v), k
    assert any(not torch.equal(v, v.bfloat16().float()) for v in full.values())  # more bits than bf16
    assert "fp32 master weights" in ck.info["notes"][0]


def test_imported_mixtral_continued_under_tp2(trained):
    """The TP=2 run started from the imported weights (lr 1e-4 for 3 steps moves them by <1e-3;
    a fresh init would differ by ~0.02) and did train (weights moved)."""
    from safetensors.torch import load_file

    run_dir, _ = trained["tp2_imported_mixtral"]
    start = load_file(str(run_dir.parent / "mixtral" / "mm" / "model.safetensors"))
    end = load_file(str(run_dir / "ckpt" / "global_step3" / "model.safetensors"))
    assert sorted(start) == sorted(end)
    moved = max((end[k] - start[k]).abs().max().item() for k in start)
    assert 0 < moved < 1e-3, moved


def test_parity_sees_a_wrong_dense_gelu(trained, tmp_path, monkeypatch):
    """The same trained GELU checkpoint exported with exact GELU in its dense block (the old bug)
    fails check_parity: the tolerance is tight enough on trained weights."""
    from transformers import AutoModelForCausalLM

    import megamoe.hf  # noqa: F401
    from megamoe.hf import configs
    from megamoe.hf.checkpoint_reader import load_checkpoint, model_configs
    from megamoe.hf.export import export_model
    from megamoe.model.state_dict import load_full_state_dict
    from tests.hf.common import build_native

    run_dir, _ = trained["ep2_gelu_dense_block"]
    ck = load_checkpoint(run_dir / "ckpt")
    model_cfg, moe_cfg = model_configs(ck.config)
    real = configs.hf_config

    def exact_gelu(*a, **k):
        c = real(*a, **k)
        assert c.gelu_approximate == "tanh"  # what the export writes now
        c.gelu_approximate = "none"
        return c

    monkeypatch.setattr(configs, "hf_config", exact_gelu)
    export_model(ck.state_dict, model_cfg, moe_cfg, tmp_path / "bug")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "bug").eval()
    native = build_native(model_cfg, moe_cfg)
    load_full_state_dict(native, ck.state_dict)
    with pytest.raises(AssertionError):
        check_parity(native, hf)
