"""Adapters: no-op at init, closed forms, reductions between methods, TensorPoly construction,
MTA stages, gradient isolation, a toy two-task fit per method, config errors."""

import pytest
import torch

from megamoe.config import ConfigError
from megamoe.finetune.adapters import wrap
from megamoe.finetune.config import AdapterConfig
from megamoe.finetune.inject import (
    count_params,
    inject_adapters,
    set_mta_stage,
    set_task_ids,
)
from megamoe.finetune.tensorpoly import kron_rows, root_len

METHODS = ["lora", "poly", "cpoly", "tensorpoly1", "tensorpoly2", "mta"]
I, O, T = 8, 6, 2


def _cfg(method, **kw):
    return AdapterConfig(method=method, num_tasks=T, rank=2, alpha=4.0, num_skills=3, bottleneck=4, **kw)


def _randomise_zero_side(layer):
    """Make the zero-initialised side non-zero so the adapter actually contributes."""
    with torch.no_grad():
        for n, p in layer.adapter.named_parameters():
            if "B" in n or n.startswith(("up", "private_B")):
                p.normal_()


@pytest.mark.parametrize("method", METHODS)
def test_noop_at_init(method):
    torch.manual_seed(0)
    base = torch.nn.Linear(I, O)
    layer = wrap(base, _cfg(method))
    layer.adapter.task_ids = torch.tensor([0, 1, 1])
    x = torch.randn(3, 5, I)
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_lora_closed_form():
    torch.manual_seed(0)
    layer = wrap(torch.nn.Linear(I, O), _cfg("lora"))
    _randomise_zero_side(layer)
    x = torch.randn(4, I)
    a = layer.adapter
    ref = x @ layer.base.weight.t() + layer.base.bias + (4.0 / 2) * x @ a.lora_A.t() @ a.lora_B.t()
    torch.testing.assert_close(layer(x.unsqueeze(1)).squeeze(1), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_poly_one_skill_is_lora(training):
    torch.manual_seed(0)
    lora = wrap(torch.nn.Linear(I, O), _cfg("lora"))
    poly = wrap(lora.base, AdapterConfig(method="poly", num_tasks=T, rank=2, alpha=4.0, num_skills=1))
    _randomise_zero_side(lora)
    with torch.no_grad():
        poly.adapter.skills_A.copy_(lora.adapter.lora_A[None])
        poly.adapter.skills_B.copy_(lora.adapter.lora_B[None])
    poly.train(training)
    poly.adapter.task_ids = torch.tensor([1, 0])
    x = torch.randn(2, 3, I)
    torch.testing.assert_close(poly(x), lora(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("splits", [1, 2])
def test_cpoly_without_private_is_poly(training, splits):
    torch.manual_seed(0)
    base = torch.nn.Linear(I, O)
    poly = wrap(base, _cfg("poly", num_splits=splits))
    cpoly = wrap(base, _cfg("cpoly", num_splits=splits, private_skills=0))
    _randomise_zero_side(poly)
    cpoly.adapter.load_state_dict(poly.adapter.state_dict())
    for m in (poly, cpoly):
        m.train(training)
        m.adapter.task_ids = torch.tensor([0, 1, 1])
    x = torch.randn(3, 4, I)
    torch.manual_seed(1)
    y_poly = poly(x)
    torch.manual_seed(1)
    torch.testing.assert_close(cpoly(x), y_poly, rtol=1e-6, atol=1e-6)


def test_cpoly_eval_hand_formula():
    """Eval weights: sigmoid of shared and private logits, normalised jointly (the default)."""
    torch.manual_seed(0)
    layer = wrap(torch.nn.Linear(I, O), _cfg("cpoly", private_skills=1)).eval()
    _randomise_zero_side(layer)
    a = layer.adapter
    with torch.no_grad():
        a.skill_logits.normal_()
        a.private_logits.normal_()
    t = 1
    ws, wp = torch.sigmoid(a.skill_logits[t, 0]), torch.sigmoid(a.private_logits[t, 0])
    z = ws.sum() + wp.sum()
    A = sum(ws[s] / z * a.skills_A[s] for s in range(3)) + wp[0] / z * a.private_A[t, 0]
    B = sum(ws[s] / z * a.skills_B[s] for s in range(3)) + wp[0] / z * a.private_B[t, 0]
    x = torch.randn(1, 2, I)
    a.task_ids = torch.tensor([t])
    ref = layer.base(x) + 2.0 * x @ A.t() @ B.t()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_mhr_blocks_route_separately():
    torch.manual_seed(0)
    layer = wrap(torch.nn.Linear(I, O), _cfg("poly", num_splits=2)).eval()
    a = layer.adapter
    with torch.no_grad():
        a.skill_logits.copy_(torch.tensor([[[9.0, -9, -9], [-9, 9, -9]]] * T))
    A, _ = a.factors(torch.tensor([0]))
    torch.testing.assert_close(A[0, :, :4], a.skills_A[0, :, :4], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(A[0, :, 4:], a.skills_A[1, :, 4:], rtol=1e-3, atol=1e-3)
    with pytest.raises(ConfigError, match="num_splits"):
        wrap(torch.nn.Linear(I, 5), _cfg("poly", num_splits=2))


def test_tensorpoly_construction():
    assert [root_len(d, n) for d, n in [(8, 3), (9, 3), (10, 2), (16, 2), (17, 2), (1, 4)]] == [2, 3, 4, 4, 5, 1]
    u = torch.tensor([[1.0, 2.0], [3.0, 5.0], [7.0, 11.0]])  # N=3, m=2
    # kron([1,2],[3,5],[7,11]) = [21,33,35,55,42,66,70,110] truncated to 6
    assert kron_rows(u, 6).tolist() == [21, 33, 35, 55, 42, 66]
    torch.testing.assert_close(kron_rows(u, 8), torch.kron(torch.kron(u[0], u[1]), u[2]))
    torch.manual_seed(0)
    cfg = _cfg("tensorpoly1", tensor_order=2, tensor_components=3)
    layer = wrap(torch.nn.Linear(10, 17), cfg).eval()
    a = layer.adapter
    assert a.vec_A.shape == (2, 3, 2, 4) and a.vec_B.shape == (2, 3, 2, 5)
    A, B = a.factors(torch.tensor([0, 1]))
    assert A.shape == (2, 2, 10) and B.shape == (2, 17, 2)
    w = torch.sigmoid(a.logits[0]) / torch.sigmoid(a.logits[0]).sum()
    ref = sum(w[k] * torch.kron(a.vec_A[1, k, 0], a.vec_A[1, k, 1])[:10] for k in range(3))
    torch.testing.assert_close(A[0, 1], ref)
    two = wrap(torch.nn.Linear(10, 17), _cfg("tensorpoly2", tensor_order=2, tensor_skills=3)).eval()
    assert two.adapter.vec_A.shape == (2, 2, 2, 3, 4) and two.adapter.logits.shape == (T, 2, 3)
    assert sum(p.numel() for p in a.parameters()) < sum(p.numel() for p in wrap(
        torch.nn.Linear(10, 17), _cfg("poly")).adapter.parameters())


def test_mta_stage2_freezes_adapters():
    torch.manual_seed(0)
    layer = wrap(torch.nn.Linear(I, O), _cfg("mta"))
    _randomise_zero_side(layer)
    for p in layer.base.parameters():
        p.requires_grad_(False)
    set_mta_stage(layer, 2)
    before = {n: p.detach().clone() for n, p in layer.adapter.named_parameters()}
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)
    x, tasks = torch.randn(6, 3, I), torch.tensor([0, 1, 0, 1, 0, 1])
    layer.adapter.task_ids = tasks
    for _ in range(3):
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()
    for n, p in layer.adapter.named_parameters():
        if n == "router":
            assert not torch.equal(p, before[n])
        else:
            assert torch.equal(p, before[n]), n
    # stage 1: own adapter only -> the other task's adapter gets no gradient
    set_mta_stage(layer, 1)
    layer.adapter.task_ids = torch.zeros(6, dtype=torch.long)
    layer.zero_grad()
    layer(x).pow(2).mean().backward()
    assert layer.adapter.router.grad is None
    assert layer.adapter.up.grad[1].abs().max() == 0 and layer.adapter.up.grad[0].abs().max() > 0


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(I, I)
        self.v_proj = torch.nn.Linear(I, 2)

    def forward(self, x):
        return self.v_proj(torch.tanh(self.q_proj(x))).mean(1)


@pytest.mark.parametrize("method", METHODS)
def test_grads_only_trainable_and_toy_fit(method):
    """Two tasks with opposite labelling of the same inputs: only task routing can fit both."""
    torch.manual_seed(0)
    model = _Toy()
    ads = inject_adapters(model, _cfg(method), batch_dim=0)
    assert len(ads) == 2
    trainable, total = count_params(model)
    assert 0 < trainable == sum(p.numel() for a in ads for p in a.parameters()) < total + trainable
    x = torch.randn(32, 3, I)
    y0 = (x[:, :, 0].mean(1) > 0).long()
    tasks = torch.arange(32) % 2
    y = torch.where(tasks == 0, y0, 1 - y0)
    set_task_ids(model, tasks)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if not losses:
            for n, p in model.named_parameters():
                assert (p.grad is not None) == p.requires_grad or not p.requires_grad, n
                assert p.requires_grad == (".adapter." in n), n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], (method, losses[0], losses[-1])
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n


def test_config_errors():
    with pytest.raises(ConfigError, match="method"):
        AdapterConfig(method="prefix")
    with pytest.raises(ConfigError, match="rank"):
        AdapterConfig(rank=0)
    with pytest.raises(ConfigError, match="target_modules"):
        AdapterConfig(target_modules=["qq_proj"])
    with pytest.raises(ConfigError, match="private_skills"):
        AdapterConfig(method="cpoly", private_skills=-1)
    with pytest.raises(ConfigError, match="temperature"):
        AdapterConfig(temperature=0)
