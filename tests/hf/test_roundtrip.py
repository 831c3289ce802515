"""Llama / Mixtral made with transformers -> convert_from_hf -> convert_to_hf reproduces every
tensor exactly (same names, dtypes, values), and the config keeps its architecture."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file


def tiny_llama(path, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 5000.0})
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return model


def tiny_mixtral(path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64)
    model = MixtralForCausalLM(cfg)
    model.save_pretrained(path)
    return model


def run_cli(module, argv):
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    return e.value.code


def roundtrip(src, tmp_path):
    from tools import convert_from_hf, convert_to_hf

    assert run_cli(convert_from_hf, ["--hf-dir", str(src), "--output", str(tmp_path / "mm")]) == 0
    assert run_cli(convert_to_hf, ["--checkpoint", str(tmp_path / "mm"), "--output", str(tmp_path / "back"),
                                   "--no-tokenizer"]) == 0
    return tmp_path / "back"


def assert_same_tensors(a_dir, b_dir):
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("tie", [False, True])
def test_llama_roundtrip_exact(tmp_path, tie):
    tiny_llama(tmp_path / "src", tie)
    back = roundtrip(tmp_path / "src", tmp_path)
    assert_same_tensors(tmp_path / "src", back)
    src_cfg, cfg = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "src", back))
    for key in ("architectures", "model_type", "hidden_size", "intermediate_size", "num_key_value_heads",
                "rope_parameters", "rms_norm_eps", "tie_word_embeddings", "vocab_size"):
        assert cfg[key] == src_cfg[key], key


def test_mixtral_roundtrip_exact(tmp_path):
    tiny_mixtral(tmp_path / "src")
    back = roundtrip(tmp_path / "src", tmp_path)
    assert_same_tensors(tmp_path / "src", back)
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == 4
    assert cfg["num_experts_per_tok"] == 2


def test_mixtral_fused_layout_imports(tmp_path):
    """transformers-5 in-memory (fused gate_up_proj) tensors map to the same canonical experts."""
    from megamoe.hf import mapping

    model = tiny_mixtral(tmp_path / "src")
    fused = {k: v.detach() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in fused)
    legacy = load_file(str(tmp_path / "src" / "model.safetensors"))
    canon = mapping.from_hf(fused, "mixtral")
    assert canon.keys() == mapping.from_hf(legacy, "mixtral").keys()
    again = mapping.to_hf(canon, "mixtral")
    assert sorted(again) == sorted(legacy)
    for k in legacy:
        assert torch.equal(again[k], legacy[k]), k


def test_unmapped_tensor_is_an_error():
    from megamoe.errors import UserError
    from megamoe.hf import mapping

    with pytest.raises(UserError, match="no entry in the conversion table"):
        mapping.to_hf({"embed.weight": torch.zeros(2, 2), "layers.0.moe.router.table": torch.zeros(2)}, "llama")


def test_imported_checkpoint_builds_and_matches_transformers(tmp_path):
    """The imported canonical weights load strictly into the native model, which then computes
    the same logits as the transformers model they came from."""
    from megamoe.hf.import_ import import_hf
    from megamoe.model.state_dict import load_full_state_dict
    from tests.hf.common import build_native

    hf = tiny_mixtral(tmp_path / "src").eval()
    model_cfg, moe_cfg, sd = import_hf(tmp_path / "src")
    native = build_native(model_cfg, moe_cfg)
    load_full_state_dict(native, sd)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (native(ids).logits - hf(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["switch", "hash", "mpo"])
def test_upcycle_dense_llama(tmp_path, kind):
    """--upcycle: with zero noise every expert equals the dense FFN, so the MoE model computes
    exactly the dense model (top-1 Switch scales by p, so it is checked at the expert level)."""
    from tools import convert_from_hf

    from megamoe.hf.checkpoint_reader import load_checkpoint, model_configs
    from megamoe.model.state_dict import load_full_state_dict
    from tests.hf.common import build_native

    hf = tiny_llama(tmp_path / "src").eval()
    argv = ["--hf-dir", str(tmp_path / "src"), "--output", str(tmp_path / "mm"), "--upcycle", kind,
            "--num-experts", "4", "--every", "2", "--noise", "0", "--mpo-tensors", "3"]
    assert run_cli(convert_from_hf, argv) == 0
    ck = load_checkpoint(tmp_path / "mm")
    model_cfg, moe_cfg = model_configs(ck.config)
    assert moe_cfg.moe_layer_indices(2) == [1]
    dense_up = load_file(str(tmp_path / "src" / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"]
    if kind == "mpo":
        from megamoe.moe.mpo import contract

        sd = ck.state_dict
        chain = [sd["layers.1.moe.experts.3.up_proj.aux0"], sd["layers.1.moe.experts.up_proj.central"],
                 sd["layers.1.moe.experts.3.up_proj.aux2"]]
        assert (contract(chain) - dense_up).abs().max() <= 1e-5
    else:
        assert torch.equal(ck.state_dict["layers.1.moe.experts.3.up_proj.weight"], dense_up)
    native = build_native(model_cfg, moe_cfg)
    load_full_state_dict(native, ck.state_dict)
    if kind == "hash":  # weight 1 per token: exactly the dense model
        ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert (native(ids).logits - hf(ids).logits).abs().max() <= 1e-5


def test_import_errors(tmp_path, capsys):
    from tools import convert_from_hf

    def err(argv):
        assert run_cli(convert_from_hf, argv) == 2
        return capsys.readouterr().err

    assert "no config.json" in err(["--hf-dir", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    tiny_mixtral(tmp_path / "mix")
    assert "needs a dense checkpoint" in err(["--hf-dir", str(tmp_path / "mix"), "--output", str(tmp_path / "o"),
                                              "--upcycle", "switch"])
    cfg = json.loads((tmp_path / "mix" / "config.json").read_text())
    (tmp_path / "mix" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    assert "hidden_act='gelu' is not supported" in err(["--hf-dir", str(tmp_path / "mix"),
                                                         "--output", str(tmp_path / "o")])
    (tmp_path / "mix" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert "model_type='gpt2'" in err(["--hf-dir", str(tmp_path / "mix"), "--output", str(tmp_path / "o")])
    (tmp_path / "mix" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "mix" / "model.safetensors").unlink()
    assert "no model.safetensors" in err(["--hf-dir", str(tmp_path / "mix"), "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
