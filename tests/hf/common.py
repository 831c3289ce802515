"""Shared pieces of the HF conversion tests: tiny native models, a tiny tokenizer, subprocess helpers."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import torch

from megamoe.model.config import HashConfig, ModelConfig, MoEConfig, MPOConfig, RouterConfig

ROOT = Path(__file__).resolve().parents[2]
V = 128

# A paragraph in the style of the default corpus (plain English prose with punctuation,
# numbers and a few non-ASCII characters), written for these tests.
PARAGRAPH = (
    "Mr. Speaker, the state of our union is strong, and it grows stronger each year that we "
    "choose to invest in our people. In 1946 the Congress passed 27 bills on trade; today we "
    "count more than 3,000 pages of law. The river towns along the Missouri -- from Omaha to "
    "St. Louis -- built schools, libraries and hospitals. Café owners in Zürich and São Paulo "
    "still ask: \"what will tomorrow's markets bring?\" We answer with work, with science, and "
    "with peace."
)


def tiny_model(**kw) -> ModelConfig:
    base = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64,
                max_position_embeddings=64)
    base.update(kw)
    return ModelConfig(**base)


def moe_cases(counts_file: str) -> dict[str, tuple[ModelConfig, MoEConfig]]:
    """The model families of the acceptance list (+ a few megamoe-only features).
    Learned routers use eval_capacity_factor = E/K, i.e. capacity = T: no token can drop, so
    native eval equals the dropless HF model (see modeling_megamoe's docstring)."""
    r1 = RouterConfig(top_k=1, eval_capacity_factor=4.0)
    r2 = RouterConfig(top_k=2, eval_capacity_factor=2.0)
    return {
        "dense": (tiny_model(num_kv_heads=2), MoEConfig()),
        "switch_top1": (tiny_model(), MoEConfig(num_experts=4, every=1, router=r1)),
        "top2": (tiny_model(), MoEConfig(num_experts=4, every=1, router=r2)),
        "hash_random": (tiny_model(), MoEConfig(num_experts=4, every=2, hash_layers=[1],
                                                hash=HashConfig(variant="random"))),
        "hash_balanced": (tiny_model(), MoEConfig(num_experts=4, hash_layers=[0, 1],
                                                  hash=HashConfig(variant="balanced", counts_file=counts_file))),
        "mpo": (tiny_model(), MoEConfig(num_experts=4, every=1, expert_type="mpo", router=r1,
                                        mpo=MPOConfig(num_tensors=3))),
        "multihash_previous_gelu_layernorm": (
            tiny_model(activation="gelu", norm="layernorm", position_embedding="learned", bias=True,
                       tie_embeddings=True),
            MoEConfig(num_experts=4, hash_layers=[1], hash=HashConfig(variant="previous", num_hashes=2))),
        "position_hash": (tiny_model(), MoEConfig(num_experts=4, hash_layers=[1],
                                                  hash=HashConfig(variant="position", num_hashes=2))),
        "bigram_hash_mpo": (tiny_model(), MoEConfig(num_experts=4, hash_layers=[0],
                                                    hash=HashConfig(variant="bigram", expert_type="mpo"),
                                                    mpo=MPOConfig(num_tensors=3))),
    }


def write_counts(path: Path) -> str:
    import numpy as np

    rng = np.random.default_rng(0)
    np.save(path, (rng.zipf(1.3, V) % 1000).astype(np.int64))
    return str(path)


def train_spm(path: Path, model_type: str = "bpe", vocab_size: int = 400) -> Path:
    """A tiny byte-fallback SentencePiece model with pad/bos/eos recorded (as tools/train_tokenizer does)."""
    import sentencepiece as spm

    import random

    rng = random.Random(0)
    words = PARAGRAPH.replace(",", " ").replace(".", " ").split()
    lines = [PARAGRAPH] + [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(300)]
    f = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, vocab_size=vocab_size,
                                   model_type=model_type, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=3, minloglevel=2, hard_vocab_limit=False,
                                   character_coverage=0.98)
    path.write_bytes(f.getvalue())
    return path


def build_native(model_cfg: ModelConfig, moe_cfg: MoEConfig, seed: int = 0):
    from megamoe.model.gpt import build_model

    torch.manual_seed(seed)
    return build_model(model_cfg, moe_cfg).eval()


def isolated_python(code: str, cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that cannot import megamoe: ``-I`` (no user site, no
    PYTHONPATH, no script dir on sys.path), cwd outside the repository. The editable install's
    path hook is removed from sys.meta_path/sys.path before anything else runs."""
    guard = ("import sys, importlib.util\n"
             f"sys.path[:] = [p for p in sys.path if p not in ('', {str(ROOT)!r})]\n"
             "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__ "
             "and 'megamoe' not in repr(f)]\n"
             "assert importlib.util.find_spec('megamoe') is None, 'megamoe is importable'\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-I", "-c", guard + code, *args], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=timeout)
