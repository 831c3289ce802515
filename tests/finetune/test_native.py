"""Adapters inside the native megamoe decoder: no-op at init, frozen base, classifier path."""

import pytest
import torch

from megamoe.finetune.classify import MultiTaskClassifier
from megamoe.finetune.config import AdapterConfig
from megamoe.finetune.inject import (
    adapters,
    count_params,
    inject_adapters,
    set_task_ids,
)
from megamoe.model.config import ModelConfig, MoEConfig
from megamoe.model.gpt import build_model

TINY = {"vocab_size": 64, "hidden_size": 16, "num_layers": 2, "num_heads": 2, "ffn_hidden_size": 32,
        "max_position_embeddings": 16}


def _model(moe=False):
    torch.manual_seed(0)
    return build_model(ModelConfig(**TINY), MoEConfig(num_experts=2, layers=[1]) if moe else MoEConfig())


@pytest.mark.parametrize("method", ["lora", "cpoly", "tensorpoly2", "mta"])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["all"]])
def test_native_noop_at_init_and_frozen_base(method, targets):
    model = _model()
    ids = torch.randint(0, 64, (3, 8))
    ref = model(ids).logits
    cfg = AdapterConfig(method=method, num_tasks=2, rank=2, num_skills=2, bottleneck=4, target_modules=targets)
    ads = inject_adapters(model, cfg)
    assert len(ads) == (4 if targets != ["all"] else 2 * 7)
    assert all(a.batch_dim == 1 for a in ads)
    set_task_ids(model, torch.tensor([0, 1, 1]))
    model.train()
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
    trainable, _ = count_params(model)
    assert trainable == sum(p.numel() for a in adapters(model) for p in a.parameters())


def test_native_moe_experts_not_adapted():
    model = _model(moe=True)
    ads = inject_adapters(model, AdapterConfig(method="lora", num_tasks=1, target_modules=["all"]))
    assert len(ads) == 2 * 4 + 3  # q,k,v,o of both layers + the dense FFN of layer 0
    assert not any(".moe" in n for n, p in model.named_parameters() if p.requires_grad)


def test_classifier_grads_reach_only_adapters_and_head():
    model = _model()
    inject_adapters(model, AdapterConfig(method="poly", num_tasks=2, rank=2, num_skills=2))
    clf = MultiTaskClassifier(model, 16, [3, 2])
    ids, lengths = torch.randint(1, 64, (4, 8)), torch.tensor([8, 5, 3, 1])
    tasks, labels = torch.tensor([0, 1, 0, 1]), torch.tensor([2, 1, 0, 0])
    logits = clf(ids, lengths, tasks)
    assert torch.isinf(logits[0, 3:]).all() and torch.isinf(logits[1, :3]).all()
    # right padding does not change an example's logits (causal model, last real token pooled)
    padded = ids.clone()
    padded[2, 3:] = 0
    torch.testing.assert_close(clf(padded, lengths, tasks)[2], logits[2])
    clf.loss(logits, labels, tasks).backward()
    for n, p in clf.named_parameters():
        trainable = n.startswith("head.") or ".adapter." in n
        assert p.requires_grad == trainable, n
        assert (p.grad is not None) == trainable, n
    assert clf.predict(logits, tasks).max() < 3
