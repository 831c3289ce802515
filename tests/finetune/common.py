"""Tiny HF models and native checkpoints for the fine-tuning tests."""

from __future__ import annotations

from pathlib import Path

import torch

from megamoe.finetune.data import TaskSplit

V, D = 32, 16


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(cfg).train()


def native_checkpoint(out: Path, moe: bool | str = False, vocab: int = V) -> Path:
    """A tiny random native megamoe checkpoint (model.safetensors + megamoe_config.yaml);
    ``moe``: False (dense -> Llama export), True (top-1 Switch layer -> megamoe), "top2" (every
    block a top-2 SwiGLU MoE -> Mixtral)."""
    from megamoe.hf.import_ import write_checkpoint
    from megamoe.model.config import ModelConfig, MoEConfig, RouterConfig
    from megamoe.model.gpt import build_model
    from megamoe.model.state_dict import gather_full_state_dict

    torch.manual_seed(0)
    m = ModelConfig(vocab_size=vocab, hidden_size=D, num_layers=2, num_heads=2, ffn_hidden_size=32,
                    max_position_embeddings=16)
    if moe == "top2":
        e = MoEConfig(num_experts=4, every=1, router=RouterConfig(top_k=2, combine="renormalize"))
    else:
        e = MoEConfig(num_experts=2, layers=[1]) if moe else MoEConfig()
    model = build_model(m, e)
    return write_checkpoint(out, m, e, gather_full_state_dict(model), source="test")


def split(n: int, seed: int) -> TaskSplit:
    """Two synthetic tasks: task 0 two classes, task 1 three, both read the last token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, 6), generator=g)
    tasks = torch.arange(n) % 2
    labels = torch.where(tasks == 0, (ids[:, -1] < V // 2).long(), ids[:, -1] % 3)
    return TaskSplit(ids, torch.full((n,), 6), labels, tasks)
