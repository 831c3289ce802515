"""Shared experts and the stock Qwen2-MoE target (issue 12 item 6).

- megamoe architecture: shared experts, ungated and sigmoid-gated, beside learned and hash
  routers, export with check_parity (fp32 logits <= 5e-6, loss <= 1e-5, 20 greedy tokens equal)
  on perturbed weights (every tensor moved by N(0, 0.05^2): routing, gates and biases far from
  init). Each test first shows that the shared expert changes the native logits by > 1e-3, and
  that the export with its gate zeroed (sigmoid = 1/2), or Qwen2-MoE with the other
  ``norm_topk_prob``, fails the same check. Measured: max |logit diff| 0 to 2.4e-7.
- qwen2_moe: ``--target auto`` picks Qwen2MoeForCausalLM for softmax top-k SwiGLU MoE with a
  gated shared expert (top-2 renormalised, top-1 prob, top-1 straight-through, a dense block);
  export -> convert_from_hf -> native computes the same logits, gives back the same MoEConfig
  (training-only settings too: seq / global / z losses, capacity, N x W) and re-exports the
  same tensors; a transformers-made Qwen2-MoE with nonzero q/k/v biases imports exactly and
  exports back to identical tensors.
- bad cases end in one error line naming the field.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from megamoe.errors import UserError
from megamoe.model.config import HashMoEConfig, MoEConfig, RouterConfig
from tests.hf.common import V, build_native, tiny_model
from tests.hf.test_parity import check_parity, export_and_load
from tests.hf.test_roundtrip import assert_same_tensors, run_cli


def perturbed(model_cfg, moe_cfg, seed: int = 0, std: float = 0.05):
    native = build_native(model_cfg, moe_cfg, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in native.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return native


def shared_moe(gate: bool, **kw) -> MoEConfig:
    base = dict(num_experts=4, every=1, expert_ffn_hidden_size=64, shared_experts=2, shared_expert_ffn_hidden_size=16, shared_expert_gate=gate,
                router=RouterConfig(top_k=2, eval_capacity_factor=0.0))
    base.update(kw)
    return MoEConfig(**base)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))


def shared_matters(native):
    """The shared experts move the native logits by > 1e-3 (zeroing their down_proj)."""
    ref = logits(native, IDS)
    saved = {}
    for i, block in enumerate(native.layers):
        if getattr(block, "moe", None) is not None and block.moe.shared_expert is not None:
            w = block.moe.shared_expert.down_proj.weight
            saved[i] = w.detach().clone()
            with torch.no_grad():
                w.zero_()
    assert saved
    off = logits(native, IDS)
    with torch.no_grad():
        for i, w in saved.items():
            native.layers[i].moe.shared_expert.down_proj.weight.copy_(w)
    assert (ref - off).abs().max() > 1e-3


MEGAMOE_CASES = {
    "ungated_top2": (tiny_model(), shared_moe(False)),
    "gated_top2": (tiny_model(), shared_moe(True)),
    "ungated_hash_and_switch": (tiny_model(num_layers=3), MoEConfig(
        num_experts=4, layers=[2], hash_layers=[0], shared_experts=1,
        router=RouterConfig(top_k=1, combine="prob", eval_capacity_factor=0.0))),
    "gated_gelu_bias_mixed": (tiny_model(activation="gelu", bias=True, num_layers=3), MoEConfig(
        num_experts=4, layers=[1], shared_experts=1, shared_expert_ffn_hidden_size=24, shared_expert_gate=True,
        router=RouterConfig(top_k=2, eval_capacity_factor=0.0))),
    # DeepSeek-V4 style: 2 leading hash-MoE blocks, then learned top-2, a gated shared expert in all
    "gated_hash_moe_v4": (tiny_model(num_layers=3), shared_moe(True, shared_experts=1, hash_moe=HashMoEConfig(layers=2))),
}


@pytest.mark.parametrize("name", list(MEGAMOE_CASES))
def test_shared_experts_megamoe_architecture(name, tmp_path):
    from megamoe.model.state_dict import gather_full_state_dict

    model_cfg, moe_cfg = MEGAMOE_CASES[name]
    native = perturbed(model_cfg, moe_cfg)
    shared_matters(native)
    import megamoe.hf  # noqa: F401
    from megamoe.hf.export import export_model
    from transformers import AutoModelForCausalLM

    out = export_model(gather_full_state_dict(native), model_cfg, moe_cfg, tmp_path / "hf", target="megamoe")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "MegamoeForCausalLM"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["shared_expert_intermediate_size"] == moe_cfg.shared_experts * (
        moe_cfg.shared_expert_ffn_hidden_size or model_cfg.ffn_hidden_size)
    assert cfg["shared_expert_gate"] == moe_cfg.shared_expert_gate
    diff = check_parity(native, hf)
    print(f"{name}: max |logit diff| {diff:.2e}")
    if moe_cfg.shared_expert_gate:  # a dropped gate (sigmoid(0) = 1/2 instead) is caught
        with torch.no_grad():
            for block in hf.model.layers:
                if block.kind != "dense":
                    block.moe.shared_expert_gate.weight.zero_()
        with pytest.raises(AssertionError):
            check_parity(native, hf)


def test_auto_target_for_shared_experts():
    """Ungated -> megamoe; gated -> qwen2_moe (also at top-1 and with dense blocks); the same
    models with a hash layer, MPO experts, expert bias or sigmoid scoring -> megamoe."""
    from megamoe.hf.configs import choose_target

    m = tiny_model()
    assert choose_target("auto", m, shared_moe(False)) == "megamoe"
    assert choose_target("auto", m, shared_moe(True)) == "qwen2_moe"
    assert choose_target("auto", m, shared_moe(True, router=RouterConfig(top_k=1))) == "qwen2_moe"
    assert choose_target("auto", m, shared_moe(True, every=0, layers=[1])) == "qwen2_moe"
    for kw in (dict(every=0, layers=[1], hash_layers=[0]), dict(expert_type="mpo"),
               dict(router=RouterConfig(top_k=2, expert_bias_rate=1e-3)),
               dict(router=RouterConfig(top_k=2, scoring="sigmoid"))):
        assert choose_target("auto", m, shared_moe(True, **kw)) == "megamoe", kw
    assert choose_target("auto", m, MoEConfig(num_experts=4, every=1, router=RouterConfig(top_k=2))) == "mixtral"


QWEN_CASES = {
    # straight_through (the default) has the value of renormalize: norm_topk_prob=True
    "top2_renormalized": (tiny_model(), shared_moe(True)),
    "top1_prob_dense_block_tied_gqa": (
        tiny_model(num_layers=3, tie_embeddings=True, num_kv_heads=2, rope_theta=5000.0),
        shared_moe(True, every=0, layers=[1, 2], shared_experts=1, shared_expert_ffn_hidden_size=None,
                   router=RouterConfig(top_k=1, combine="prob", eval_capacity_factor=0.0))),
    "top1_straight_through": (tiny_model(), shared_moe(True, router=RouterConfig(top_k=1, eval_capacity_factor=0.0))),
}


@pytest.mark.parametrize("name", list(QWEN_CASES))
def test_qwen2_moe_export_auto(name, tmp_path):
    from megamoe.model.state_dict import gather_full_state_dict

    model_cfg, moe_cfg = QWEN_CASES[name]
    native = perturbed(model_cfg, moe_cfg)
    shared_matters(native)
    hf = export_and_load(model_cfg, moe_cfg, gather_full_state_dict(native), tmp_path / "hf")
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    moe_layers = moe_cfg.moe_layer_indices(model_cfg.num_layers)
    assert cfg["norm_topk_prob"] == (moe_cfg.router.combine != "prob")
    assert cfg["mlp_only_layers"] == [i for i in range(model_cfg.num_layers) if i not in moe_layers]
    assert cfg["shared_expert_intermediate_size"] == moe_cfg.shared_experts * (
        moe_cfg.shared_expert_ffn_hidden_size or model_cfg.ffn_hidden_size)
    assert cfg["qkv_bias"] is True and cfg["use_sliding_window"] is False
    files = load_file(str(tmp_path / "hf" / "model.safetensors"))
    biases = [k for k in files if k.endswith(".bias")]
    assert len(biases) == 3 * model_cfg.num_layers and all(not files[k].any() for k in biases)
    diff = check_parity(native, hf)
    print(f"{name}: max |logit diff| {diff:.2e}")
    for layer in moe_layers:  # the other norm_topk_prob is caught
        gate = hf.model.layers[layer].mlp.gate
        gate.norm_topk_prob = not gate.norm_topk_prob
    with pytest.raises(AssertionError):
        check_parity(native, hf)


def test_qwen2_moe_export_import_roundtrip(tmp_path):
    """export (qwen2_moe) -> convert_from_hf -> the same native model and MoEConfig, incl. the
    training-only settings -> convert_to_hf writes the same tensors again."""
    from tools import convert_from_hf, convert_to_hf

    from megamoe.hf.checkpoint_reader import load_checkpoint, model_configs
    from megamoe.hf.export import export_model
    from megamoe.model.state_dict import gather_full_state_dict, load_full_state_dict

    model_cfg = tiny_model(num_layers=3)
    moe_cfg = shared_moe(True, every=0, layers=[0, 2], router=RouterConfig(
        top_k=2, capacity_factor=1.5, eval_capacity_factor=0.0, aux_loss_coef=0.02, z_loss_coef=0.003,
        seq_aux_loss_coef=0.001, global_aux_loss_coef=0.004, drop_policy="position"))
    native = perturbed(model_cfg, moe_cfg)
    export_model(gather_full_state_dict(native), model_cfg, moe_cfg, tmp_path / "hf")
    assert run_cli(convert_from_hf, ["--hf-dir", str(tmp_path / "hf"), "--output", str(tmp_path / "mm")]) == 0
    ck = load_checkpoint(tmp_path / "mm")
    m2, moe2 = model_configs(ck.config)
    assert m2 == dataclasses.replace(model_cfg, num_kv_heads=model_cfg.kv_heads) and moe2 == moe_cfg, (m2, moe2)
    back = build_native(m2, moe2, seed=5)
    load_full_state_dict(back, ck.state_dict)
    diff = (logits(back, IDS) - logits(native, IDS)).abs().max().item()
    assert diff <= 1e-6, diff
    assert run_cli(convert_to_hf, ["--checkpoint", str(tmp_path / "mm"), "--output", str(tmp_path / "again"),
                                   "--no-tokenizer"]) == 0
    assert_same_tensors(tmp_path / "hf", tmp_path / "again")


def test_mixtral_export_keeps_training_settings(tmp_path):
    """The seq / global-batch / z loss coefficients and capacity survive Mixtral export -> import."""
    from megamoe.hf.configs import from_hf_config
    from megamoe.hf.export import export_model
    from megamoe.model.state_dict import gather_full_state_dict

    moe_cfg = MoEConfig(num_experts=4, every=1, expert_ffn_hidden_size=64, router=RouterConfig(
        top_k=2, eval_capacity_factor=0.0, seq_aux_loss_coef=0.01, global_aux_loss_coef=0.02, z_loss_coef=0.0,
        capacity_factor=2.0, combine="renormalize"))
    out = export_model(gather_full_state_dict(build_native(tiny_model(), moe_cfg)), tiny_model(), moe_cfg,
                       tmp_path / "hf")
    arch, _, moe2 = from_hf_config(json.loads((out / "config.json").read_text()), "x")
    assert arch == "mixtral" and moe2 == moe_cfg


def tiny_qwen2_moe(path, *, biases: bool):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4,
                         num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
                         rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, rms_norm_eps=1e-5)
    model = Qwen2MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape) * 0.1 if biases else torch.zeros(p.shape))
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("biases", [True, False])
def test_transformers_qwen2_moe_imports_and_exports_back(tmp_path, biases):
    """A Qwen2-MoE made with transformers (a dense block, top-2 without renormalisation, q/k/v
    biases nonzero or zero) -> convert_from_hf: the native model computes its logits; ->
    convert_to_hf (auto picks qwen2_moe again): the same tensors as the source."""
    from tools import convert_from_hf

    from megamoe.hf.checkpoint_reader import load_checkpoint, model_configs
    from megamoe.model.state_dict import load_full_state_dict
    from tests.hf.test_roundtrip import roundtrip

    hf = tiny_qwen2_moe(tmp_path / "src", biases=biases)
    back = roundtrip(tmp_path / "src", tmp_path)
    assert_same_tensors(tmp_path / "src", back)
    assert json.loads((back / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]
    ck = load_checkpoint(tmp_path / "mm")
    model_cfg, moe_cfg = model_configs(ck.config)
    assert model_cfg.bias == biases and moe_cfg.moe_layer_indices(3) == [0, 2]
    assert moe_cfg.router.combine == "prob" and moe_cfg.shared_expert_gate and moe_cfg.shared_experts == 1
    native = build_native(model_cfg, moe_cfg)
    load_full_state_dict(native, ck.state_dict)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    diff = (logits(native, ids) - logits(hf, ids)).abs().max().item()
    assert diff <= 1e-5, diff
    assert convert_from_hf is not None


def test_qwen2_moe_fused_layout_imports(tmp_path):
    """transformers-5 in-memory (fused gate_up_proj) experts map to the same canonical tensors."""
    from megamoe.hf import mapping

    model = tiny_qwen2_moe(tmp_path / "src", biases=True)
    fused = {k: v.detach() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in fused)
    legacy = load_file(str(tmp_path / "src" / "model.safetensors"))
    a, b = mapping.from_hf(fused, "qwen2_moe"), mapping.from_hf(legacy, "qwen2_moe")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_import_refusals(tmp_path, capsys):
    from tools import convert_from_hf

    tiny_qwen2_moe(tmp_path / "q", biases=False)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    for change, want in (({"use_sliding_window": True}, "use_sliding_window=True is not supported"),
                         ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
                         ({"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size=0 is not supported")):
        (tmp_path / "q" / "config.json").write_text(json.dumps({**cfg, **change}))
        assert run_cli(convert_from_hf, ["--hf-dir", str(tmp_path / "q"), "--output", str(tmp_path / "o")]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and want in errors[0], errors
        assert not (tmp_path / "o").exists()


def test_export_refusals(tmp_path, capsys):
    """--target qwen2_moe on what Qwen2-MoE cannot compute: one line naming the setting, no output."""
    from tests.hf.test_cli import canonical_checkpoint, to_hf

    cases = {
        "ungated": (tiny_model(), shared_moe(False), "moe.shared_expert_gate=false"),
        "no_shared": (tiny_model(), MoEConfig(num_experts=4, every=1, router=RouterConfig(top_k=2)),
                      "moe.shared_experts=0"),
        "bias_rate": (tiny_model(), shared_moe(True, router=RouterConfig(top_k=2, expert_bias_rate=1e-3)),
                      "moe.router.expert_bias_rate>0"),
        # a megamoe model.bias model: its o_proj biases are random, Qwen2-MoE has none
        "o_proj_bias": (tiny_model(bias=True), shared_moe(True), "model.bias=true with nonzero layers.0.attn.o_proj.bias"),
    }
    for name, (m, moe, want) in cases.items():
        ck, native = canonical_checkpoint(tmp_path, name, m, moe)
        if name == "o_proj_bias":
            with torch.no_grad():
                native.layers[0].attn.o_proj.bias.fill_(0.1)
            from megamoe.hf.import_ import write_checkpoint
            from megamoe.model.state_dict import gather_full_state_dict

            write_checkpoint(ck, m, moe, gather_full_state_dict(native), source=name, overwrite=True)
        assert to_hf(["--checkpoint", str(ck), "--output", str(tmp_path / "out"), "--target", "qwen2_moe",
                      "--no-tokenizer"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and want in errors[0], (name, errors)
        assert not (tmp_path / "out").exists()


def test_bias_model_with_zero_extra_biases_exports_to_qwen2(tmp_path):
    """model.bias with zero o_proj / dense-FFN biases (what a Qwen import is) -> qwen2_moe, exact."""
    from megamoe.model.state_dict import gather_full_state_dict

    model_cfg, moe_cfg = tiny_model(bias=True, num_layers=3), shared_moe(True, every=0, layers=[0, 2])
    native = perturbed(model_cfg, moe_cfg)
    with torch.no_grad():
        for name, p in native.named_parameters():
            if name.endswith(".bias") and (".o_proj." in name or ".mlp." in name):
                p.zero_()
    sd = gather_full_state_dict(native)
    hf = export_and_load(model_cfg, moe_cfg, sd, tmp_path / "hf")
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    check_parity(native, hf)
    with pytest.raises(UserError, match="with nonzero"):
        from megamoe.hf.configs import choose_target

        choose_target("qwen2_moe", model_cfg, moe_cfg, {**sd, "layers.1.mlp.up_proj.bias": torch.ones(64)})


def test_llama_export_with_biases(tmp_path):
    """A dense model.bias model -> Llama (attention_bias, mlp_bias): the conversion table maps its biases."""
    from megamoe.model.state_dict import gather_full_state_dict

    model_cfg = tiny_model(bias=True)
    native = perturbed(model_cfg, MoEConfig())
    hf = export_and_load(model_cfg, MoEConfig(), gather_full_state_dict(native), tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM"
    check_parity(native, hf)
