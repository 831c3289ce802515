"""Central-tensor gradient masks (single process; the 2-rank identity check lives in
test_layer_parallel.py to share its process spawn)."""

import torch

from megamoe.model.config import MoEConfig, MPOConfig
from megamoe.moe.grad_mask import CentralGradMask, param_groups
from megamoe.moe.layer import MoELayer
from tests.moe.helpers import D, E, model_cfg


def _layer(mode, p=0.5, scale=1.0):
    torch.manual_seed(0)
    cfg = MPOConfig(num_tensors=3, grad_mask=mode, grad_mask_p=p, central_lr_scale=scale)
    layer = MoELayer(model_cfg(), MoEConfig(num_experts=E, every=1, expert_type="mpo", mpo=cfg), 0)
    return layer, CentralGradMask(layer.experts.centrals(), cfg)


def _step(layer, mask, step, opt=None):
    mask.set_step(step)
    y, st = layer(torch.randn(32, D, generator=torch.Generator().manual_seed(step)))
    (y.square().sum() + st.weighted_loss).backward()
    if opt:
        opt.step()
        opt.zero_grad()


def test_bernoulli_zeroes_half_fresh_each_step_and_reproducible():
    layer, mask = _layer("bernoulli")
    fracs, patterns = [], []
    for step in (1, 2):
        _step(layer, mask, step)
        g = layer.experts.centrals()[0].grad
        patterns.append(g == 0)
        fracs.append((g == 0).float().mean().item())
        layer.zero_grad()
    assert all(0.4 < f < 0.6 for f in fracs), fracs
    assert not torch.equal(patterns[0], patterns[1])  # fresh mask per step
    layer2, mask2 = _layer("bernoulli")
    _step(layer2, mask2, 1)
    assert torch.equal(layer2.experts.centrals()[0].grad == 0, patterns[0])  # seeded


def test_step_mode_skips_whole_gradient():
    layer, mask = _layer("step", p=0.5)
    skipped = []
    for step in range(12):
        _step(layer, mask, step)
        grads = [c.grad for c in layer.experts.centrals()]
        skipped.append(all(bool((g == 0).all()) for g in grads))
        assert skipped[-1] or all(bool((g != 0).any()) for g in grads)  # all-or-nothing, all centrals alike
        layer.zero_grad()
    assert 2 <= sum(skipped) <= 10, skipped


def test_freeze_keeps_central_bit_identical():
    layer, mask = _layer("freeze", scale=0.1)
    before = [c.detach().clone() for c in layer.experts.centrals()]
    aux_before = layer.experts.up_proj.aux0[0].detach().clone()
    groups = param_groups(layer, lr=1e-2, central_lr_scale=0.1)
    assert len(groups) == 1  # frozen centrals are not in the optimizer at all
    opt = torch.optim.AdamW(groups, weight_decay=0.1)
    for step in range(3):
        _step(layer, mask, step, opt)
    for b, c in zip(before, layer.experts.centrals()):
        assert torch.equal(b, c) and not c.requires_grad
    assert not torch.equal(aux_before, layer.experts.up_proj.aux0[0])


def test_separate_lr_group():
    layer, _ = _layer("none", scale=0.25)
    groups = param_groups(layer, lr=1e-3, central_lr_scale=0.25)
    central = [g for g in groups if g["name"] == "mpo_central"][0]
    assert central["lr"] == 0.25e-3 and len(central["params"]) == 3
    assert sum(len(g["params"]) for g in groups) == len(list(layer.parameters()))
