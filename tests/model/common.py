"""Tiny model configs shared by the model tests (D=32, 2 layers, V=128, S=16)."""

from __future__ import annotations

import torch

from megamoe.model.config import ModelConfig, MoEConfig

V, S, B = 128, 16, 4


def tiny_model(**kw) -> ModelConfig:
    base = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64,
                max_position_embeddings=32)
    base.update(kw)
    return ModelConfig(**base)


def batch(seed: int = 0, b: int = B, s: int = S):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, s + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def build(model_cfg: ModelConfig, moe_cfg: MoEConfig | None = None, seed: int = 0, parallel_cfg=None):
    from megamoe.model.gpt import build_model

    torch.manual_seed(seed)
    return build_model(model_cfg, moe_cfg or MoEConfig(), parallel_cfg)
