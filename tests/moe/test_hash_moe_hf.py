"""Hash-MoE in Hugging Face exports: the ``megamoe`` architecture's ``hash_moe`` blocks choose
``router.tid2eid[input_ids]`` and weight them by the gate's scores, like native.

Models of hash-MoE blocks followed by learned ones (with a gated shared expert; sqrtsoftplus
normalised x 1.5, and sigmoid unnormalised x 2.0), every weight perturbed so routing and scores
are far from init ("trained" weights: gate std 1, the rest +N(0, 0.05)). The export's logits
equal native within 5e-6 (tests/hf/test_parity.check_parity: greedy generation equal, loss
within 1e-5; the issue asks <= 1e-4), ``--target auto`` picks megamoe and stock targets are
refused naming ``moe.hash_moe.layers``; the table matters (a shuffled ``tid2eid`` moves the HF
logits by > 1e-3), so the parity is not met by a model that ignores it."""

from __future__ import annotations

import pytest
import torch

from megamoe.errors import UserError
from megamoe.model.config import HashMoEConfig, MoEConfig, RouterConfig
from tests.hf.common import build_native, tiny_model, write_counts
from tests.hf.test_parity import check_parity, export_and_load


def _moe(case: str, counts_file: str) -> tuple:
    if case == "sqrtsoftplus_balanced":
        return tiny_model(num_layers=3), MoEConfig(
            num_experts=4, every=1, shared_experts=1, shared_expert_ffn_hidden_size=16, shared_expert_gate=True,
            router=RouterConfig(top_k=2, scoring="sqrtsoftplus", routed_scaling_factor=1.5, eval_capacity_factor=2.0),
            hash_moe=HashMoEConfig(layers=2, variant="balanced", counts_file=counts_file))
    return tiny_model(num_layers=2), MoEConfig(
        num_experts=4, every=1,
        router=RouterConfig(top_k=2, scoring="sigmoid", routed_scaling_factor=2.0, eval_capacity_factor=2.0),
        hash_moe=HashMoEConfig(layers=1, top_k=3, normalize=False))


def _trained(model_cfg, moe):
    native = build_native(model_cfg, moe)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in native.named_parameters():
            if name.endswith("router.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return native


@pytest.mark.parametrize("case", ["sqrtsoftplus_balanced", "sigmoid_k3_unnormalized"])
def test_hash_moe_exports_exactly(case, tmp_path):
    from megamoe.model.state_dict import gather_full_state_dict

    model_cfg, moe = _moe(case, write_counts(tmp_path / "counts.npy"))
    native = _trained(model_cfg, moe)
    hf = export_and_load(model_cfg, moe, gather_full_state_dict(native), tmp_path / "hf")
    assert type(hf).__name__ == "MegamoeForCausalLM"
    n = moe.hash_moe.layers
    assert hf.config.mlp_types == ["hash_moe"] * n + ["learned"] * (model_cfg.num_layers - n)
    assert torch.equal(hf.model.layers[0].moe.router.tid2eid, native.layers[0].moe.router.tid2eid)
    diff = check_parity(native, hf)
    assert diff <= 5e-6

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = hf(ids).logits
        table = hf.model.layers[0].moe.router.tid2eid
        table.copy_(table[torch.randperm(table.shape[0], generator=torch.Generator().manual_seed(1))])
        after = hf(ids).logits
    assert (after - before).abs().max() > 1e-3


def test_stock_targets_refuse_hash_moe(tmp_path):
    from megamoe.hf.export import export_model
    from megamoe.model.state_dict import gather_full_state_dict

    model_cfg, moe = _moe("sigmoid_k3_unnormalized", "")
    sd = gather_full_state_dict(build_native(model_cfg, moe))
    for target in ("mixtral", "qwen2_moe"):
        with pytest.raises(UserError, match="moe.hash_moe.layers"):
            export_model(sd, model_cfg, moe, tmp_path / target, target=target)
        assert not (tmp_path / target).exists()
