"""Config-time parameter / FLOP accounting equals the built model (dense, Switch, top-2, hash,
MultiHash, MPO), single process and under TP=2 / EP=2 (sharded params counted once)."""

import re

import pytest

from megamoe import parallel
from megamoe.model.accounting import account
from megamoe.model.config import HashConfig, ModelConfig, MoEConfig, MPOConfig, ParallelConfig, RouterConfig
from megamoe.model.state_dict import gather_full_state_dict
from tests.distributed import run_distributed
from tests.model.common import build, tiny_model

EXPERT = re.compile(r"\.moe\.experts\.(\d+)\.")

CASES = {
    "dense": (tiny_model(), MoEConfig()),
    "dense_tied_learned_bias": (tiny_model(tie_embeddings=True, position_embedding="learned", bias=True,
                                           norm="layernorm", activation="gelu", num_kv_heads=2), MoEConfig()),
    "switch": (tiny_model(), MoEConfig(num_experts=4, every=1)),
    "top2": (tiny_model(), MoEConfig(num_experts=4, layers=[1], router=RouterConfig(top_k=2))),
    "hash": (tiny_model(), MoEConfig(num_experts=4, hash_layers=[0, 1])),
    "multihash_ffn": (tiny_model(), MoEConfig(num_experts=4, hash_layers=[0], hash=HashConfig(num_hashes=2))),
    "multihash_mpo": (tiny_model(), MoEConfig(num_experts=4, hash_layers=[1], hash=HashConfig(
        num_hashes=2, expert_type="mpo"))),
    "mpo_truncated": (tiny_model(), MoEConfig(num_experts=4, layers=[0], hash_layers=[1], expert_type="mpo",
                                              mpo=MPOConfig(max_bond_dim=3))),
}


def _built_counts(sd: dict, moe: MoEConfig, cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) counted from a canonical full state dict: every floating tensor once;
    per-expert tensors weighted by (expert tensors a token touches) / E: top_k for learned
    routing; for MultiHash with N hashes, N experts' MPO auxiliary tensors, but only one FFN
    expert's worth (N blocks of F/N rows)."""
    total = active = 0.0
    for k, v in sd.items():
        if not v.is_floating_point():
            continue  # hash tables are int64 buffers
        total += v.numel()
        m = EXPERT.search(k)
        if m is None:
            active += v.numel()
        else:
            layer = int(k.split(".")[1])
            if layer in moe.hash_layers:
                touched = moe.hash.num_hashes if moe.hash.expert_type == "mpo" else 1
            else:
                touched = moe.router.top_k
            active += v.numel() * touched / moe.num_experts
    return int(total), round(active)


@pytest.mark.parametrize("name", list(CASES))
def test_accounting_matches_built_model(name):
    cfg, moe = CASES[name]
    acc = account(cfg, moe)
    model = build(cfg, moe)
    assert acc.total == sum(p.numel() for p in model.parameters())
    total, active = _built_counts(gather_full_state_dict(model), moe, cfg)
    assert acc.total == total
    assert acc.active == active
    assert acc.embedding == cfg.vocab_size * 32 + (32 * 32 if cfg.position_embedding == "learned" else 0)
    assert acc.active_nonembedding == acc.active - acc.embedding
    if not moe.num_experts:
        assert acc.total == acc.active


def test_moe_active_smaller_and_flops():
    cfg = ModelConfig(vocab_size=32000, hidden_size=512, num_layers=8, num_heads=8, ffn_hidden_size=1408)
    dense = account(cfg)
    # platform.md anchor: LlamaForCausalLM D=512, 8 layers, F=1408, V=32000 has 58.5 M params,
    # and 333 tokens/s at seq 512 was ~72% MFU of 129 GFLOP/s.
    assert dense.total / 1e6 == pytest.approx(58.5, abs=0.05)
    assert dense.flops_per_token(512) * 333 / 129e9 == pytest.approx(0.72, abs=0.01)
    assert dense.forward_flops_per_token(512) * 3 == dense.flops_per_token(512)
    switch = account(cfg, MoEConfig(num_experts=8, every=1))
    assert switch.total / 1e6 == pytest.approx(179.6, abs=0.1)  # MixtralForCausalLM E=8 anchor
    router = 8 * 512 * 8
    assert switch.matmul_params == dense.matmul_params + router
    assert switch.active == dense.active + router
    top2 = account(cfg, MoEConfig(num_experts=8, every=1, router=RouterConfig(top_k=2)))
    assert top2.matmul_params - switch.matmul_params == 8 * 3 * 512 * 1408
    mpo = account(cfg, MoEConfig(num_experts=8, every=1, expert_type="mpo"))
    assert mpo.matmul_params == switch.matmul_params  # experts run as dense W
    assert mpo.total < switch.total


def _sharded_body(rank, world):
    for tp, ep in ((2, 1), (1, 2)):
        parallel.init_parallel(ParallelConfig(tensor_parallel=tp, expert_parallel=ep))
        _check_sharded(tp, ep)


def _check_sharded(tp, ep):
    for name in ("switch", "mpo_truncated", "multihash_ffn"):
        cfg, moe = CASES[name]
        model = build(cfg, moe)
        local = sum(p.numel() for p in model.parameters())
        full = sum(v.numel() for v in gather_full_state_dict(model).values() if v.is_floating_point())
        acc = account(cfg, moe)
        assert full == acc.total, (name, tp, ep, full, acc.total)
        assert local < acc.total, (name, tp, ep, local)  # this rank really holds a shard


def test_accounting_sharded():
    """Under TP=2 and then EP=2 (2 ranks, one spawn) the gathered model has the config's count."""
    run_distributed(_sharded_body, 2)


@pytest.mark.parametrize("name", list(CASES))
def test_trainer_param_counts_equal_accounting(name):
    """The trainer's counts (summary.json, the studies' tables) come from the built model; they
    must equal the accounting's, MultiHash included (N blocks of F/N rows are one expert's worth)."""
    from types import SimpleNamespace

    from megamoe.train.report import param_counts

    cfg, moe = CASES[name]
    acc = account(cfg, moe)
    got = param_counts(build(cfg, moe), SimpleNamespace(model=cfg, moe=moe))
    assert (got["total"], got["active"]) == (acc.total, acc.active)
