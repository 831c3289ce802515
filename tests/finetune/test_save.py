"""Where users fine-tune: a native checkpoint or an HF export as the base; adapters saved apart
from the base (LoRA / Poly in PEFT format, loadable with PeftModel.from_pretrained on the HF
export and reproducing megamoe's outputs; the others in megamoe's format); merging."""

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from megamoe.errors import UserError
from megamoe.finetune.base_model import load_base
from megamoe.finetune.classify import final_hidden
from megamoe.finetune.config import AdapterConfig
from megamoe.finetune.inject import inject_adapters, load_adapters, merge_adapters, save_adapters, set_task_ids

from .common import V, native_checkpoint

IDS = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(0))
TASKS = torch.tensor([1, 0, 1])


def _export(tmp_path, moe=False):
    from megamoe.hf.export import export_model
    from megamoe.hf.checkpoint_reader import load_checkpoint, model_configs

    ckpt_dir = native_checkpoint(tmp_path / "native", moe=moe)
    ckpt = load_checkpoint(ckpt_dir)
    m, e = model_configs(ckpt.config)
    return ckpt_dir, export_model(ckpt.state_dict, m, e, tmp_path / "hf")


def _randomise(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("base"))


def test_native_and_hf_bases_are_the_same_model(exported):
    ckpt_dir, hf_dir = exported
    a, b = load_base(ckpt_dir), load_base(hf_dir)
    assert "native checkpoint" in a.description and "HF export" in b.description
    assert a.description.split("sha256 ")[1] == b.description.split("sha256 ")[1]  # same exported weights
    torch.testing.assert_close(final_hidden(a.build(), IDS), final_hidden(b.build(), IDS), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "poly"])
def test_peft_format_loads_with_peft_on_the_hf_export(exported, tmp_path, method):
    """Must show: a PEFT-format adapter saved by megamoe loads with PeftModel.from_pretrained on the
    exported model and reproduces megamoe's outputs."""
    ckpt_dir, hf_dir = exported
    model = load_base(ckpt_dir).build().eval()  # fine-tuned from the *native* checkpoint
    inj = inject_adapters(model, AdapterConfig(method=method, num_tasks=2, rank=2, num_skills=3, num_splits=2))
    _randomise(model)
    set_task_ids(model, TASKS)
    ours = final_hidden(model, IDS)
    save_adapters(inj, tmp_path / "ad", {"tasks": ["a", "b"]})
    assert (tmp_path / "ad" / "adapter_config.json").is_file()
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    assert not any("base_layer" in k for k in __import__("safetensors.torch").torch.load_file(
        str(tmp_path / "ad" / "adapter_model.safetensors")))  # adapters only, never the base
    base = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
    kw = {"task_ids": TASKS} if method == "poly" else {}
    theirs = pm.base_model(input_ids=IDS, output_hidden_states=True, use_cache=False, **kw).hidden_states[-1]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["cpoly", "tensorpoly1", "tensorpoly2", "mta"])
def test_megamoe_format_round_trip(exported, tmp_path, method):
    ckpt_dir, hf_dir = exported
    model = load_base(hf_dir).build().eval()
    inj = inject_adapters(model, AdapterConfig(method=method, num_tasks=2, rank=2, num_skills=3, tensor_order=2,
                                               bottleneck=4))
    _randomise(model)
    set_task_ids(model, TASKS)
    ours = final_hidden(model, IDS)
    save_adapters(inj, tmp_path / "ad")
    fresh = load_base(hf_dir).build().eval()
    load_adapters(fresh, tmp_path / "ad")
    set_task_ids(fresh, TASKS)
    torch.testing.assert_close(final_hidden(fresh, IDS), ours, rtol=0, atol=0)
    other = load_base(hf_dir).build()
    other.model.layers = other.model.layers[:1]
    with pytest.raises(UserError, match="saved for another base|no such"):
        load_adapters(other, tmp_path / "ad")


@pytest.mark.parametrize("method", ["lora", "poly", "cpoly", "tensorpoly1", "tensorpoly2"])
def test_merge_equals_adapted_model(exported, method):
    """LoRA merges outright; the task-routed ones merge one task (eval routing fixes A and B)."""
    _, hf_dir = exported
    model = load_base(hf_dir).build().eval()
    inj = inject_adapters(model, AdapterConfig(method=method, num_tasks=2, rank=2, num_skills=3, tensor_order=2))
    _randomise(model)
    task = 1
    set_task_ids(model, torch.full((3,), task))
    ref = final_hidden(model, IDS)
    merged = merge_adapters(inj, task=None if method == "lora" else task)
    assert not any(("lora_" in n or "poly_" in n or ".adapter." in n) for n, _ in merged.named_parameters())
    torch.testing.assert_close(final_hidden(merged, IDS), ref, rtol=1e-5, atol=1e-5)


def test_mta_does_not_merge(exported):
    model = load_base(exported[1]).build()
    inj = inject_adapters(model, AdapterConfig(method="mta", num_tasks=2))
    with pytest.raises(UserError, match="nonlinear"):
        merge_adapters(inj, task=0)


@pytest.mark.parametrize("moe,arch", [(True, "Megamoe"), ("top2", "Mixtral")])
def test_moe_bases_skip_experts(tmp_path, moe, arch):
    """A Switch checkpoint exports to the megamoe architecture, a top-2 SwiGLU one to Mixtral;
    expert projections are never adapted."""
    ckpt_dir, hf_dir = _export(tmp_path, moe=moe)
    base = load_base(ckpt_dir)
    assert arch in base.description
    model = base.build()
    inject_adapters(model, AdapterConfig(method="lora", target_modules=["all"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and not any(".moe." in n or "experts" in n for n in names)
