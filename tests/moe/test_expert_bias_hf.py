"""The expert bias in Hugging Face exports: the ``megamoe`` architecture chooses experts by
probability + ``router.expert_bias`` and weights them by the unbiased probability, like native.

A top-2 model of every-block MoE layers (which would export to stock Mixtral without a bias) with
a bias large enough to change choices: native logits with and without it differ by > 1e-3, the
export's logits equal native within 5e-6 (tests/hf/test_parity.check_parity, greedy generation
equal too), ``--target auto`` picks megamoe and an explicit mixtral target is refused naming the
setting; a bf16 export keeps the bias in fp32 (file and loaded model)."""

from __future__ import annotations

import pytest
import torch

from megamoe.errors import UserError
from megamoe.model.config import MoEConfig, RouterConfig
from tests.hf.common import build_native, tiny_model
from tests.hf.test_parity import check_parity, export_and_load

BIAS = torch.tensor([0.12, -0.08, 0.0, 0.05])


def _native():
    moe = MoEConfig(num_experts=4, every=1, router=RouterConfig(top_k=2, eval_capacity_factor=2.0,
                                                                expert_bias_rate=1e-3))
    native = build_native(tiny_model(), moe)
    for block in native.layers:
        block.moe.router.expert_bias.copy_(BIAS)
    return native, moe


def test_bias_changes_the_model_and_exports_exactly(tmp_path):
    from megamoe.model.state_dict import gather_full_state_dict

    native, moe = _native()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        biased = native(ids).logits
        for block in native.layers:
            block.moe.router.expert_bias.zero_()
        plain = native(ids).logits
        for block in native.layers:
            block.moe.router.expert_bias.copy_(BIAS)
    assert (biased - plain).abs().max() > 1e-3
    hf = export_and_load(native.cfg, moe, gather_full_state_dict(native), tmp_path / "hf")
    assert type(hf).__name__ == "MegamoeForCausalLM"
    assert torch.equal(hf.model.layers[0].moe.router.expert_bias, BIAS)
    diff = check_parity(native, hf)
    assert diff <= 5e-6


def test_mixtral_target_refused_and_bf16_keeps_fp32_bias(tmp_path):
    import megamoe.hf  # noqa: F401
    from megamoe.hf.export import export_model
    from megamoe.model.state_dict import gather_full_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    native, moe = _native()
    sd = gather_full_state_dict(native)
    with pytest.raises(UserError, match="expert_bias_rate"):
        export_model(sd, native.cfg, moe, tmp_path / "mixtral", target="mixtral")
    out = export_model(sd, native.cfg, moe, tmp_path / "bf16", dtype="bf16")
    files = load_file(str(out / "model.safetensors"))
    assert files["model.layers.0.moe.router.expert_bias"].dtype == torch.float32
    assert files["model.layers.0.moe.router.weight"].dtype == torch.bfloat16
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert hf.model.layers[1].moe.router.expert_bias.dtype == torch.float32
    assert torch.equal(hf.model.layers[1].moe.router.expert_bias, BIAS)
