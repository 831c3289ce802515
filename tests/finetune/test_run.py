"""The fine-tuning loop end to end on a tiny native model and synthetic tasks."""

import pytest
import torch

from megamoe.errors import UserError
from megamoe.finetune.config import AdapterConfig
from megamoe.finetune.data import TaskSplit
from megamoe.finetune.run import finetune_method, parse_method
from megamoe.model.config import ModelConfig, MoEConfig
from megamoe.model.gpt import build_model


def _split(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 32, (n, 6), generator=g)
    tasks = torch.arange(n) % 2
    labels = torch.where(tasks == 0, (ids[:, -1] < 16).long(), ids[:, -1] % 3)  # task 0: 2 classes, task 1: 3
    return TaskSplit(ids, torch.full((n,), 6), labels, tasks)


def test_parse_method():
    assert parse_method("lora:rank=16/alpha=8.5") == ("lora", {"rank": 16, "alpha": 8.5})
    assert parse_method("mta_one") == ("mta_one", {})
    with pytest.raises(UserError, match="rnk"):
        parse_method("lora:rnk=2")
    with pytest.raises(UserError, match="unknown"):
        parse_method("prefix")


@pytest.mark.parametrize("method", ["head", "cpoly:private_skills=2", "mta"])
def test_finetune_method_runs_and_learns(method):
    def build():
        return build_model(ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
                                       ffn_hidden_size=32, max_position_embeddings=8), MoEConfig())

    cfg = AdapterConfig(rank=2, num_skills=2, bottleneck=4)
    r = finetune_method(method, build, 16, [2, 3], _split(64, 0), _split(32, 1), cfg, steps=30, batch_size=16,
                        lr=1e-2)
    assert r["method"] == method and len(r["per_task_acc"]) == 2
    assert all(0.0 <= a <= 1.0 for a in r["per_task_acc"])
    assert (r["adapter_params"] == 0) == (method == "head")
    assert r["final_loss"] < r["first_loss"]
