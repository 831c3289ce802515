"""PEFT as the oracle: megamoe's LoRA is PEFT's LoraConfig, and megamoe's Poly/MHR code path
(C-Poly with no private skills) equals PEFT's PolyConfig(poly_type="poly", n_splits) given the
same parameters and routing state, outputs and gradients, on the same HF model."""

import copy

import peft
import pytest
import torch

from megamoe.finetune.adapters import CPoly
from megamoe.finetune.classify import final_hidden
from megamoe.finetune.config import AdapterConfig
from megamoe.finetune.inject import inject_adapters, set_task_ids

from .common import tiny_llama

TARGETS = ["q_proj", "v_proj"]


def _names(model):
    return [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]


def test_lora_is_peft_lora_and_matches_closed_form():
    """megamoe's lora arm is PEFT's LoRA; outputs and grads equal an independent PEFT model and the
    closed form W x + (alpha/r) B A x (the formula of megamoe's former hand-written LoRA)."""
    ref_base = tiny_llama()
    ours = tiny_llama()
    cfg = AdapterConfig(method="lora", rank=4, alpha=1.0, target_modules=TARGETS)
    inj = inject_adapters(ours, cfg)
    assert isinstance(inj.peft_model, peft.PeftModel)
    ref = peft.get_peft_model(ref_base, peft.LoraConfig(r=4, lora_alpha=1.0, target_modules=TARGETS,
                                                       lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for (n, p), (n2, p2) in zip(ours.named_parameters(), ref_base.named_parameters()):
            assert n == n2
            if "lora_B" in n:
                p.normal_()
            p2.copy_(p)
    ids = torch.randint(0, 32, (3, 7))
    y, y_ref = final_hidden(ours, ids), final_hidden(ref_base, ids)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads and all(("lora_" in n) for n in grads)
    for n, p in ref_base.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=0)
    # closed form on one layer
    lay = ours.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 16)
    A, B = lay.lora_A["default"].weight, lay.lora_B["default"].weight
    torch.testing.assert_close(lay(x), lay.base_layer(x) + (1.0 / 4) * x @ A.t() @ B.t(), rtol=1e-6, atol=1e-6)
    assert lay.scaling["default"] == 1.0 / 4


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("splits", [1, 2])
def test_cpoly_without_private_is_peft_poly(training, splits):
    """Same parameters, same RNG state -> same relaxed-Bernoulli draws, outputs and gradients."""
    T, S, r = 3, 4, 2
    ref_base = tiny_llama()
    ref = peft.get_peft_model(ref_base, peft.PolyConfig(r=r, target_modules=TARGETS, poly_type="poly",
                                                       n_tasks=T, n_skills=S, n_splits=splits))
    ours = tiny_llama()
    inject_adapters(ours, AdapterConfig(method="cpoly", private_skills=0, num_tasks=T, num_skills=S, rank=r,
                                        num_splits=splits, target_modules=TARGETS))
    torch.manual_seed(2)
    ref_layers = {n.replace("base_model.model.", ""): m for n, m in ref.named_modules()
                  if isinstance(m, peft.tuners.poly.layer.Linear)}
    assert len(ref_layers) == 4
    with torch.no_grad():
        for n, m in ours.named_modules():
            if isinstance(m, CPoly):
                lay = ref_layers[n.removesuffix(".adapter")]
                m.lora_B.normal_()
                m.module_logits.normal_()
                lay.poly_lora_A["default"].copy_(m.lora_A)
                lay.poly_lora_B["default"].copy_(m.lora_B)
                lay.poly_router["default"].module_logits.copy_(m.module_logits)
    ours.train(training)
    ref.train(training)
    ids, tasks = torch.randint(0, 32, (4, 6)), torch.tensor([2, 0, 1, 2])
    set_task_ids(ours, tasks)
    torch.manual_seed(7)
    y = final_hidden(ours, ids)
    torch.manual_seed(7)
    out = ref.base_model(input_ids=ids, task_ids=tasks, output_hidden_states=True, use_cache=False)
    y_ref = out.hidden_states[-1]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for n, m in ours.named_modules():
        if isinstance(m, CPoly):
            lay = ref_layers[n.removesuffix(".adapter")]
            torch.testing.assert_close(m.lora_A.grad, lay.poly_lora_A["default"].grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(m.lora_B.grad, lay.poly_lora_B["default"].grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(m.module_logits.grad, lay.poly_router["default"].module_logits.grad,
                                       rtol=1e-4, atol=1e-6)


def test_poly_method_is_peft_poly_with_task_ids():
    """method="poly" uses PEFT's PolyModel outright; megamoe's set_task_ids drives its router."""
    model = tiny_llama()
    inj = inject_adapters(model, AdapterConfig(method="poly", num_tasks=2, num_skills=3, rank=2, num_splits=2,
                                               target_modules=TARGETS))
    assert isinstance(inj.peft_model.base_model, peft.tuners.poly.PolyModel)
    twin = copy.deepcopy(inj.peft_model).eval()
    model.eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "poly_lora_B" in n or "module_logits" in n:
                p.normal_()
        twin.load_state_dict(inj.peft_model.state_dict())
    ids, tasks = torch.randint(0, 32, (2, 5)), torch.tensor([1, 0])
    set_task_ids(model, tasks)
    y = final_hidden(model, ids)
    y_ref = twin.base_model(input_ids=ids, task_ids=tasks, output_hidden_states=True, use_cache=False).hidden_states[-1]
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    set_task_ids(model, tasks.flip(0))
    assert not torch.allclose(final_hidden(model, ids), y)  # the task ids reach the router
