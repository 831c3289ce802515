"""The fine-tuning loop end to end on a tiny HF model and synthetic tasks; MTA's equal adapter
steps; the routing-entropy validity check."""

import pytest
import torch

from megamoe.errors import UserError
from megamoe.finetune.config import AdapterConfig
from megamoe.finetune.run import finetune_method, parse_method

from .common import D, split, tiny_llama


def test_parse_method():
    assert parse_method("lora:rank=16/alpha=8.5") == ("lora", {"rank": 16, "alpha": 8.5})
    assert parse_method("mta_one") == ("mta_one", {})
    assert parse_method("poly:target_modules=all") == ("poly", {"target_modules": ["all"]})
    assert parse_method("poly:target_modules=q_proj+v_proj")[1] == {"target_modules": ["q_proj", "v_proj"]}
    with pytest.raises(UserError, match="rnk"):
        parse_method("lora:rnk=2")
    with pytest.raises(UserError, match="unknown"):
        parse_method("prefix")


@pytest.mark.parametrize("method", ["head", "lora", "poly", "cpoly:private_skills=2", "tensorpoly1", "mta"])
def test_finetune_method_runs_and_learns(method):
    cfg = AdapterConfig(rank=2, num_skills=2, bottleneck=4, tensor_order=2)
    r = finetune_method(method, tiny_llama, D, [2, 3], split(64, 0), split(32, 1), cfg, steps=30, batch_size=16,
                        lr=1e-2)
    assert r["method"] == method and len(r["per_task_acc"]) == 2 and len(r["right"]) == 32
    assert all(0.0 <= a <= 1.0 for a in r["per_task_acc"])
    assert (r["adapter_params"] == 0) == (method == "head")
    assert r["adapters_moved"] is (None if method == "head" else True)
    assert r["final_loss"] < r["first_loss"]
    if method in ("poly", "cpoly:private_skills=2", "tensorpoly1"):
        e0, e1 = r["routing_entropy"]
        assert r["routing_learned"] is True and e1 < e0  # logits at lr 0.1 leave uniform in 30 steps


def test_mta_two_stage_has_the_one_stage_adapter_steps():
    """ALTER's two stages vs one stage at equal adapter steps: stage 1 = the one-stage run's
    steps; stage 2 (router only) comes on top and leaves the adapters untouched."""
    cfg = AdapterConfig(bottleneck=4)
    snaps = {}

    def grab(clf, inj):
        snaps["final"] = {n: p.detach().clone() for n, p in clf.named_parameters() if ".adapter." in n}

    two = finetune_method("mta", tiny_llama, D, [2, 3], split(64, 0), split(32, 1), cfg, steps=20, batch_size=16,
                          lr=1e-2, mta_stage2_steps=10, on_model=grab)
    one = finetune_method("mta_one", tiny_llama, D, [2, 3], split(64, 0), split(32, 1), cfg, steps=20,
                          batch_size=16, lr=1e-2)
    assert two["adapter_steps"] == one["adapter_steps"] == 20
    assert two["stage2_steps"] == 10 and one["stage2_steps"] == 0
    final = snaps["final"]
    grab_mid = {}
    finetune_method("mta", tiny_llama, D, [2, 3], split(64, 0), split(32, 1), cfg, steps=20, batch_size=16,
                    lr=1e-2, mta_stage2_steps=0, on_model=lambda c, i: grab_mid.update(
                        {n: p.detach().clone() for n, p in c.named_parameters() if ".adapter." in n}))
    for n, p in final.items():  # same seed: stage 2 changed only the router
        assert torch.equal(p, grab_mid[n]) != n.endswith("router_logits"), n


def test_finetuning_runs_on_this_ranks_gpu_when_there_is_one(monkeypatch):
    """On a GPU machine the classifier and every batch go to cuda:LOCAL_RANK (they stayed on the
    CPU: fine-tuning silently ran there, and with DeepSpeed the CPU batches met a CUDA model).
    CUDA is mocked; the batch placement is checked on the meta device."""
    from megamoe.finetune.run import _batch, finetune_device

    assert finetune_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert finetune_device() == torch.device("cuda", 1)
    data = split(8, seed=0)
    ids, lengths, labels, tasks = _batch(data, torch.tensor([0, 3, 5]), torch.device("meta"))
    assert {t.device.type for t in (ids, lengths, labels, tasks)} == {"meta"}
    assert ids.shape == (3, int(data.lengths[[0, 3, 5]].max()))


def test_a_run_whose_adapters_did_not_move_is_flagged():
    """The suite's dead-arm flag: at lr 0 nothing moves, and the run says so; a normal run moves."""
    cfg = AdapterConfig(rank=2, target_modules=["q_proj"])
    dead = finetune_method("lora", tiny_llama, D, [2, 3], split(32, 0), split(16, 1), cfg, steps=3, batch_size=8,
                           lr=0.0)
    live = finetune_method("lora", tiny_llama, D, [2, 3], split(32, 0), split(16, 1), cfg, steps=3, batch_size=8,
                           lr=1e-2)
    assert dead["adapters_moved"] is False and dead["adapter_max_change"] == 0.0
    assert live["adapters_moved"] is True and live["adapter_max_change"] > 1e-4
    head = finetune_method("head", tiny_llama, D, [2, 3], split(32, 0), split(16, 1), cfg, steps=3, batch_size=8,
                           lr=1e-2)
    assert head["adapters_moved"] is None
