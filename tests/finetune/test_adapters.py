"""Adapters: the fidelity fixes of issue 11 (each test fails on the pre-fix code), TensorPoly's
official construction, MTA on the hidden state, a toy fit that needs task routing, config errors."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import ConfigError
from megamoe.finetune.adapters import CPoly
from megamoe.finetune.base import AdaptedLinear, param_groups
from megamoe.finetune.classify import final_hidden
from megamoe.finetune.config import AdapterConfig
from megamoe.finetune.inject import adapters, count_params, inject_adapters, set_mta_stage, set_task_ids
from megamoe.finetune.mta import MTA, MTALayer
from megamoe.finetune.run import method_config
from megamoe.finetune.tensorpoly import TensorPoly, kron_rows, root_len

from .common import tiny_llama

METHODS = ["lora", "poly", "cpoly", "tensorpoly1", "tensorpoly2", "mta"]
T = 2


def _cfg(method, **kw):
    kw = {"num_tasks": T, "rank": 2, "num_skills": 3, "bottleneck": 4, "tensor_order": 2} | kw
    return AdapterConfig(method=method, **kw)


def _random_lowrank(lin, **kw):
    torch.manual_seed(0)
    return AdaptedLinear(lin, (TensorPoly if kw.get("method", "").startswith("tensor") else CPoly)(
        _cfg(**kw), lin.in_features, lin.out_features, **({} if kw.get("method", "").startswith("tensor")
                                                           else {"private_skills": 1})))


# ------------------------------------------------------------------ fidelity (issue 11 item 1)


@pytest.mark.parametrize("method", ["poly", "cpoly", "tensorpoly1", "tensorpoly2", "mta"])
def test_routing_logits_in_their_own_group_at_mttl_lr(method):
    """mttl (mttl/arguments.py, mttl/models/get_optimizer.py): module_logits at lr 0.1, no decay."""
    assert AdapterConfig().routing_lr == 0.1
    model = tiny_llama()
    inject_adapters(model, _cfg(method))
    groups = {g["name"]: g for g in param_groups(model, lr=3e-3, routing_lr=AdapterConfig().routing_lr)}
    routing = {id(p) for p in groups["routing"]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in routing}
    assert names and all(n.rsplit(".", 1)[-1] in ("module_logits", "module_logits_private", "router_logits")
                         for n in names), names
    assert groups["routing"]["lr"] == 0.1 and groups["routing"]["weight_decay"] == 0.0
    assert groups["adapters"]["lr"] == 3e-3 and not routing & {id(p) for p in groups["adapters"]["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == routing | {id(p) for p in groups["adapters"]["params"]}


@pytest.mark.parametrize("spec", ["lora", "lora:rank=16", "cpoly", "cpoly:rank=8", "tensorpoly1:rank=16",
                                  "tensorpoly2"])
def test_one_scale_convention(spec):
    """scale = alpha / rank with one alpha (default 1 = official Poly 1/r) for every LoRA-family
    row, whatever rank a row overrides (the old tool fixed alpha = 2 x the default rank, so
    lora:rank=16 got 8/16 while poly got 8/4)."""
    method, cfg = method_config(spec, AdapterConfig(rank=4, target_modules=["q_proj"]), num_tasks=2)
    model = tiny_llama()
    inject_adapters(model, cfg)
    if method == "lora":
        from peft.tuners.lora import LoraLayer
        scales = [m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)]
    else:
        scales = [a.scale for a in adapters(model)]
    assert scales and all(s == pytest.approx(1.0 / cfg.rank) for s in scales), (spec, scales)


def test_cpoly_private_skill_full_weight_by_default():
    """Default "separate": the task's private skill has weight 1 beside the shared mixture (sum 1);
    "joint" (the old default) gives it 1/(S+1) at init."""
    lin = torch.nn.Linear(8, 6)
    for normalize, expect in (("separate", 1.0), ("joint", 1.0 / 5)):
        a = CPoly(_cfg("cpoly", num_skills=4, cpoly_normalize=normalize), 8, 6, private_skills=1).eval()
        ws, wp = a.weights(torch.tensor([0, 1]))
        torch.testing.assert_close(wp, torch.full_like(wp, expect), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(ws.sum(-1), torch.full_like(ws.sum(-1), 1.0 - (expect if normalize == "joint" else 0)),
                                   rtol=1e-3, atol=1e-3)
    assert AdapterConfig().cpoly_normalize == "separate"
    del lin


def _ref_construct(leaves, lns, d, share):
    """Independent reading of mttl zs_code PolyLoRATensor(.Order).tensor_product_construct."""
    N = leaves.shape[0]
    if N == 1:
        return leaves[0][..., :d]
    def ln(x, k):
        m = lns[0 if share else k]
        return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
    def kron(a, b):  # [..., r, m] x [..., r, n] -> torch.kron per row
        return torch.stack([torch.stack([torch.kron(a[i, j], b[i, j]) for j in range(a.shape[1])])
                            for i in range(a.shape[0])])
    w01 = ln(kron(leaves[0], leaves[1]), 0)
    if N == 2:
        return w01[..., :d]
    return kron(w01, ln(kron(leaves[2], leaves[3]), 1))[..., :d]


@pytest.mark.parametrize("order", [2, 4])
def test_tensorpoly1_official_construction(order):
    torch.manual_seed(0)
    I, O = 10, 17
    a = TensorPoly(_cfg("tensorpoly1", tensor_order=order, num_skills=3, rank=2), I, O).eval()
    mA, mB = root_len(I, order), root_len(O, order)
    assert a.leaves_A.shape == (order, 3, 2, mA) and a.leaves_B.shape == (order, 3, 2, mB)
    assert len(a.norms_A) == 1 and a.norms_A[0].normalized_shape == (2, mA * mA)  # one LN, shared by the pairs
    bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(I)
    assert a.leaves_A.abs().max() <= bound and a.leaves_B.abs().max() <= bound
    assert a.leaves_B.abs().max() > 0.5 * bound  # official: B not zero
    with torch.no_grad():
        for ln in list(a.norms_A) + list(a.norms_B):
            ln.weight.normal_()
            ln.bias.normal_()
        a.module_logits.normal_()
    A, B = a.factors(torch.tensor([1]))
    w = torch.sigmoid(a.module_logits[1])
    w = w / w.sum()
    refA = torch.einsum("s,sri->ri", w, _ref_construct(a.leaves_A, a.norms_A, I, share=True))
    refB = torch.einsum("s,sro->ro", w, _ref_construct(a.leaves_B, a.norms_B, O, share=True))
    torch.testing.assert_close(A[0], refA, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(B[0], refB.t(), rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 3, I)
    a.task_ids = torch.tensor([1])
    torch.testing.assert_close(a(x), x @ refA.t() @ refB / 2, rtol=1e-4, atol=1e-5)  # scale 1/r


@pytest.mark.parametrize("order", [1, 2, 4])
def test_tensorpoly2_official_construction(order):
    torch.manual_seed(0)
    I, O = 10, 17
    a = TensorPoly(_cfg("tensorpoly2", tensor_order=order, num_skills=3, rank=2), I, O).eval()
    assert a.module_logits.shape == (T, order * 3)
    assert len(a.norms_A) == {1: 0, 2: 1, 4: 2}[order]  # layerone / layertwo
    with torch.no_grad():
        for ln in list(a.norms_A) + list(a.norms_B):
            ln.weight.normal_()
            ln.bias.normal_()
        a.module_logits.normal_()
    A, B = a.factors(torch.tensor([0]))
    w = torch.sigmoid(a.module_logits[0]).view(order, 3)
    w = w / w.sum(-1, keepdim=True)
    mixA = torch.einsum("ns,nsrm->nrm", w, a.leaves_A)[:, None] * w.sum(-1)[:, None, None, None]
    mixB = torch.einsum("ns,nsrm->nrm", w, a.leaves_B)[:, None] * w.sum(-1)[:, None, None, None]
    torch.testing.assert_close(A[0], _ref_construct(mixA, a.norms_A, I, share=False)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(B[0], _ref_construct(mixB, a.norms_B, O, share=False)[0].t(), rtol=1e-5, atol=1e-5)


def test_tensorpoly_init_official_vs_zero():
    """Official init changes the model at init (B not zero); tensor_init="zero" is a no-op."""
    lin = torch.nn.Linear(10, 17)
    x = torch.randn(2, 3, 10)
    for method in ("tensorpoly1", "tensorpoly2"):
        for init, noop in (("official", False), ("zero", True)):
            torch.manual_seed(0)
            layer = AdaptedLinear(lin, TensorPoly(_cfg(method, tensor_init=init), 10, 17))
            layer.adapter.task_ids = torch.tensor([0, 1])
            assert torch.equal(layer(x), lin(x)) == noop, (method, init)


def test_mta_adapts_each_decoder_layer_hidden_state():
    """ALTER: adapters on every layer's output hidden state, mixed by a router (not on q/v)."""
    model = tiny_llama(layers=3)
    ref = tiny_llama(layers=3)
    inj = inject_adapters(model, _cfg("mta"))
    assert all(isinstance(m, MTALayer) for m in model.model.layers) and len(adapters(model)) == 3
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    ids, tasks = torch.randint(0, 32, (2, 5)), torch.tensor([0, 1])
    set_task_ids(model, tasks)
    torch.testing.assert_close(final_hidden(model, ids), final_hidden(ref, ids), rtol=0, atol=0)  # no-op at init
    with torch.no_grad():
        for a in adapters(model):
            a.up.normal_()
            a.router_logits.normal_()
    # layer 0 by hand: h + sum_e g_e (GELU(h Wd_e + bd_e) Wu_e + bu_e)
    h = {}
    model.model.layers[0].layer.register_forward_hook(lambda m, i, o: h.setdefault("in", o))
    model.model.layers[0].register_forward_hook(lambda m, i, o: h.setdefault("out", o))
    final_hidden(model, ids)
    a = adapters(model)[0]
    g = torch.softmax(a.router_logits[tasks], -1)
    mix = sum(g[:, e, None, None] * (F.gelu(h["in"] @ a.down[e].t() + a.down_bias[e]) @ a.up[e].t() + a.up_bias[e])
              for e in range(T))
    torch.testing.assert_close(h["out"], h["in"] + mix, rtol=1e-5, atol=1e-6)
    assert inj.peft_model is None


def test_mta_stages_freeze_the_right_parts():
    torch.manual_seed(0)
    model = tiny_llama()
    inject_adapters(model, _cfg("mta"))
    with torch.no_grad():
        for a in adapters(model):
            a.up.normal_()
    ids, tasks = torch.randint(0, 32, (4, 5)), torch.tensor([0, 1, 0, 1])
    set_task_ids(model, tasks)
    set_mta_stage(model, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapter." in n}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        final_hidden(model, ids).square().mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        if ".adapter." in n:
            assert torch.equal(p, before[n]) != n.endswith("router_logits"), n
    set_mta_stage(model, 1)  # own adapter only: task 1's adapter gets no gradient from task-0 examples
    set_task_ids(model, torch.zeros(4, dtype=torch.long))
    model.zero_grad()
    final_hidden(model, ids).square().mean().backward()
    a = adapters(model)[0]
    assert a.router_logits.grad is None
    assert a.up.grad[1].abs().max() == 0 and a.up.grad[0].abs().max() > 0


# ------------------------------------------------------------------ generic behaviour


@pytest.mark.parametrize("method", ["lora", "poly", "cpoly", "mta", "tensorpoly1:tensor_init=zero",
                                    "tensorpoly2:tensor_init=zero"])
def test_noop_at_init_and_frozen_base(method):
    model, ref = tiny_llama(), tiny_llama()
    _, cfg = method_config(method, _cfg("lora"), T)
    inject_adapters(model, cfg)
    ids = torch.randint(0, 32, (3, 6))
    set_task_ids(model, torch.tensor([0, 1, 1]))
    torch.testing.assert_close(final_hidden(model, ids), final_hidden(ref, ids), rtol=0, atol=1e-6)
    trainable, _ = count_params(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable > 0 and all(("lora_" in n or "poly_" in n or ".adapter." in n) for n in names), names


def test_mhr_blocks_route_separately():
    a = CPoly(_cfg("cpoly", num_splits=2, private_skills=0), 8, 6, private_skills=0).eval()
    with torch.no_grad():
        a.module_logits.copy_(torch.tensor([[9.0, -9, -9, -9, 9, -9]] * T))
    A, _ = a.factors(torch.tensor([0]))  # A [1, r, I]: first 4 in-features from skill 0, last 4 from skill 1
    torch.testing.assert_close(A[0, :, :4], a.lora_A[0, 0].t(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(A[0, :, 4:], a.lora_A[1, 1].t(), rtol=1e-3, atol=1e-3)
    with pytest.raises(ConfigError, match="num_splits"):
        CPoly(_cfg("cpoly", num_splits=2), 8, 5, private_skills=0)


def test_kron_rows_and_root_len():
    assert [root_len(d, n) for d, n in [(8, 3), (9, 3), (10, 2), (16, 2), (17, 2), (1, 4), (128, 4)]] == \
        [2, 3, 4, 4, 5, 1, 4]
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0, 7.0])
    torch.testing.assert_close(kron_rows(a, b), torch.kron(a, b))


class _Toy(torch.nn.Module):
    """Stands in for an HF decoder: model.model(input_ids=...) -> (hidden,)."""

    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"hidden_size": 8})()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8)])
        self.model.q_proj = torch.nn.Linear(8, 8)
        self.model.v_proj = torch.nn.Linear(8, 2)

    def forward(self, x):
        m = self.model
        return m.v_proj(torch.tanh(m.q_proj(x) + m.layers[0](x))).mean(1)


@pytest.mark.parametrize("method", METHODS)
def test_toy_fit_needs_routing(method):
    """The same inputs for every task, opposite labels: a task-blind model is stuck at ln 2, so
    only task routing fits. Shared LoRA must stay at ln 2; every routed method must get below."""
    torch.manual_seed(0)
    model = _Toy()
    cfg = _cfg(method, tensor_init="zero", num_skills=2)
    inject_adapters(model, cfg)
    x = torch.randn(16, 3, 8).repeat(2, 1, 1)                      # every input twice ...
    tasks = torch.arange(32) // 16                                  # ... once per task
    y0 = (x[:16, :, 0].mean(1) > 0).long()
    y = torch.cat([y0, 1 - y0])
    set_task_ids(model, tasks)
    opt = torch.optim.AdamW(param_groups(model, 0.05, cfg.routing_lr))
    for _ in range(150):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    if method == "lora":
        assert loss.item() > math.log(2) - 1e-3, loss.item()
    else:
        assert loss.item() < 0.5 * math.log(2), (method, loss.item())


def test_config_errors():
    with pytest.raises(ConfigError, match="method"):
        AdapterConfig(method="prefix")
    with pytest.raises(ConfigError, match="rank"):
        AdapterConfig(rank=0)
    with pytest.raises(ConfigError, match="target_modules"):
        AdapterConfig(target_modules=["qq_proj"])
    with pytest.raises(ConfigError, match="private_skills"):
        AdapterConfig(method="cpoly", private_skills=-1)
    with pytest.raises(ConfigError, match="tensor_order"):
        AdapterConfig(method="tensorpoly1", tensor_order=3)
    with pytest.raises(ConfigError, match="method"):
        AdapterConfig(method="poly", temperature=0.5)
    with pytest.raises(ConfigError, match="temperature"):
        AdapterConfig(temperature=0)


def test_no_import_cycle_between_adapter_modules():
    """adapters.py, tensorpoly.py and mta.py import only the shared base module (and config);
    the factory lives in inject.py alone."""
    import ast
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[2] / "megamoe" / "finetune"
    for name in ("adapters", "tensorpoly", "mta", "base"):
        tree = ast.parse((pkg / f"{name}.py").read_text())
        siblings = {n.module.rsplit(".", 1)[-1] for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("megamoe.finetune")}
        assert siblings <= {"base", "config"} - {name}, (name, siblings)
        assert "def build_adapter" not in (pkg / f"{name}.py").read_text()


@pytest.mark.parametrize("method", ["cpoly", "tensorpoly1", "tensorpoly2", "mta"])
def test_adapters_are_created_on_the_base_models_device(method):
    """A base model already on a GPU (``device_map="cuda"``, ``.cuda()``) gets its adapters there:
    megamoe's own adapters were created on the CPU, and the first forward mixed devices. The meta
    device stands in for CUDA; PEFT's LoRA/Poly move theirs themselves."""
    model = tiny_llama().to("meta")
    inject_adapters(model, _cfg(method))
    found = adapters(model)
    assert found and {p.device.type for a in found for p in a.parameters()} == {"meta"}


# ------------------------------------------------------------------ no dead arms (issue 29)

_ORDERS_INITS = [(o, i) for o in (1, 2, 4) for i in ("official", "zero")]


def _grad_cases():
    """Every adapter the suite offers; TensorPoly at every order and init the config accepts."""
    cases = [("lora", {}), ("poly", {}), ("cpoly", {}), ("cpoly:num_skills=0", {}), ("mta_one", {})]
    for method in ("tensorpoly1", "tensorpoly2"):
        for order, init in _ORDERS_INITS:
            try:
                AdapterConfig(method=method, tensor_order=order, tensor_init=init)
            except ConfigError:
                continue  # refused at construction: no arm can run it
            cases.append((method, {"tensor_order": order, "tensor_init": init}))
    return cases


def _group(name: str) -> str:
    """A parameter's group: its name without the layer and module path (``leaves_B``,
    ``norms_A.0.weight``, ``lora_B.default.weight``, ``down``)."""
    return re.split(r"_proj\.|layers\.\d+\.", name)[-1].removeprefix("adapter.")


@pytest.mark.parametrize("method, kw", _grad_cases(), ids=lambda x: x if isinstance(x, str) else
                         "-".join(f"{k}={v}" for k, v in x.items()))
def test_every_adapter_parameter_group_gets_a_gradient_from_init(method, kw):
    """No dead arms: from the init every parameter group of every offered adapter (TensorPoly at
    every order and init) gets a non-zero gradient within two steps. LoRA-convention adapters
    (one factor zero) give the other factor and the routing no gradient at step 0 -- by design,
    the zero factor's gradient moves it -- so the check is: the step-0 gradient is non-zero
    somewhere, and after one SGD step every group's gradient is. ``tensor_init=zero`` at order 4
    failed it: B = kron(LN(.)=0, LN(.)=0) is a bilinear saddle where every adapter gradient
    stays exactly 0 (the dead arm of the old suite, issue 29)."""
    torch.manual_seed(0)
    model = tiny_llama()
    _, cfg = method_config(method, _cfg("lora", **({"rank": 2, "num_skills": 2} | kw)), T)
    inject_adapters(model, cfg)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and p.numel()}
    assert params
    ids, tasks = torch.randint(0, 32, (4, 6)), torch.tensor([0, 1, 0, 1])
    set_task_ids(model, tasks)
    target = torch.randn(4, 6, 16)

    def grads():
        model.zero_grad()
        (final_hidden(model, ids) - target).square().mean().backward()
        return {n: p.grad.abs().max().item() if p.grad is not None else 0.0 for n, p in params.items()}

    g0 = grads()
    assert max(g0.values()) > 1e-6, f"{method} {kw}: every adapter gradient is 0 at init (a saddle)"
    with torch.no_grad():
        for n, p in params.items():
            if p.grad is not None:
                p -= 0.1 * p.grad / (p.grad.abs().max() + 1e-30)
    g1 = grads()
    per_group = {}
    for n, g in g1.items():
        per_group[_group(n)] = max(per_group.get(_group(n), 0.0), g)
    dead = sorted(k for k, g in per_group.items() if not g > 1e-7)
    assert not dead, f"{method} {kw}: no gradient after one step in {dead}"
