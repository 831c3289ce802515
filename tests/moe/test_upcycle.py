"""Upcycling preserves the dense model: a dense decoder upcycled into Switch or MPO experts
(top-1 and top-k, zero noise, dropless) gives the dense model's logits at init.

Today's bug this guards: at top-1 the combine weight was the router probability (~1/E at
init), so an upcycled block computed ~FFN/E and the model was no longer the dense one."""

import pytest
import torch

from megamoe.errors import UserError
from megamoe.hf.import_ import upcycle
from megamoe.model.config import ModelConfig, MoEConfig, MPOConfig, RouterConfig
from megamoe.model.gpt import build_model
from megamoe.model.state_dict import gather_full_state_dict, load_full_state_dict
from megamoe.moe.upcycle import upcycle_layer

E = 4


def _model_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, ffn_hidden_size=64,
                       max_position_embeddings=32)


def _moe_cfg(expert_type: str, top_k: int, combine: str = "straight_through") -> MoEConfig:
    router = RouterConfig(top_k=top_k, capacity_factor=0.0, eval_capacity_factor=0.0, combine=combine)
    return MoEConfig(num_experts=E, layers=[0, 2], expert_type=expert_type, router=router,
                     mpo=MPOConfig(num_tensors=3))


def _dense():
    torch.manual_seed(0)
    dense = build_model(_model_cfg(), MoEConfig()).eval()
    with torch.no_grad():  # a "trained" dense model: weights well away from the init scale
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dense


def _upcycled(dense, moe_cfg):
    sd = upcycle(_model_cfg(), moe_cfg, gather_full_state_dict(dense), noise=0.0, seed=1)
    torch.manual_seed(2)
    model = build_model(_model_cfg(), moe_cfg).eval()
    load_full_state_dict(model, sd)
    return model


IDS = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("expert_type", ["ffn", "mpo"])
@pytest.mark.parametrize("top_k,combine", [(1, "straight_through"), (2, "straight_through"), (2, "renormalize")])
def test_upcycled_model_gives_dense_logits(expert_type, top_k, combine):
    dense = _dense()
    model = _upcycled(dense, _moe_cfg(expert_type, top_k, combine))
    with torch.no_grad():
        want, got = dense(IDS).logits, model(IDS).logits
    err = (got - want).abs().max().item()
    print(f"{expert_type} top-{top_k} {combine}: max |logit diff| {err:.2e} (logits max {want.abs().max():.2f})")
    # fp32 error: FFN copies are bit-equal (the sum order of the combine differs at top-2); an
    # exact MPO reproduces each matrix to ~1e-6 relative.
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_straight_through_top1_keeps_router_gradient():
    """Value 1 at top-1, but the router still learns through the combine (p / p.detach())."""
    model = _upcycled(_dense(), _moe_cfg("ffn", 1)).train()
    model(IDS, labels=IDS).loss.backward()
    grad = model.layers[0].moe.router.weight.grad
    assert grad is not None and grad.abs().max() > 0


def test_prob_combine_is_not_the_dense_model_and_is_refused():
    """The Switch-paper weight p scales each upcycled block by ~1/E at init: far from dense."""
    dense = _dense()
    with pytest.raises(UserError, match="combine=prob"):
        _upcycled(dense, _moe_cfg("ffn", 1, combine="prob"))
    layer = build_model(_model_cfg(), _moe_cfg("ffn", 1, combine="prob")).layers[0].moe
    d = gather_full_state_dict(dense)
    upcycle_layer(layer, {k: d[f"layers.0.mlp.{k}"] for k in ("gate_proj.weight", "up_proj.weight",
                                                               "down_proj.weight")}, allow_prob_combine=True)
    x = torch.randn(64, 32)
    with torch.no_grad():
        y, _ = layer.eval()(x)
        ffn = dense.layers[0].mlp(x)
    ratio = (y.norm(dim=-1) / ffn.norm(dim=-1)).mean().item()
    print(f"prob combine: |upcycled block| / |dense FFN| = {ratio:.3f} (1/E = {1 / E})")
    assert abs(ratio - 1 / E) < 0.1
