"""Tiny data and configs for the training tests (a few seconds to build, cached per session).

The corpus is synthetic text from a small Markov chain over words, so a model can lower its
loss quickly and different layouts see exactly the same tokens. A SentencePiece model is
trained on it and the documents are written as a Megatron indexed dataset.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import yaml

from megamoe.parallel import free_port

ROOT = Path(__file__).resolve().parents[2]


def make_dataset(out: Path, n_docs: int = 400, seed: int = 0) -> tuple[str, str]:
    """Returns (dataset prefix, tokenizer .model path)."""
    import numpy as np
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out.mkdir(parents=True, exist_ok=True)
    prefix, model = out / "tiny_text_document", out / "spm.model"
    if Path(f"{prefix}.idx").is_file():
        return str(prefix), str(model)
    rng = random.Random(seed)
    words = ["the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "to", "house", "big", "small",
             "red", "blue", "tree", "bird", "sang", "under", "over", "quickly", "slowly", "ate", "fish"]
    nxt = {w: rng.sample(words, 4) for w in words}
    docs = []
    for _ in range(n_docs):
        w = rng.choice(words)
        toks = []
        for _ in range(rng.randint(20, 60)):
            toks.append(w)
            w = rng.choice(nxt[w])
        docs.append(" ".join(toks) + ".")
    text = out / "corpus.txt"
    text.write_text("\n".join(docs) + "\n")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out / "spm"), vocab_size=64,
                                   model_type="bpe", eos_id=2, bos_id=1, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for d in docs:
        import torch

        builder.add_item(torch.tensor(sp.encode(d) + [sp.eos_id()], dtype=torch.int32))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix), str(model)


def tiny_config(prefix: str, tok: str, run_dir: Path, *, moe: bool = True, **over) -> dict:
    """A hash + MPO + Switch model small enough for 10 steps in seconds."""
    cfg = {
        "name": "tiny",
        "model": {"vocab_size": 64, "hidden_size": 32, "num_layers": 3, "num_heads": 4, "ffn_hidden_size": 64,
                  "max_position_embeddings": 64},
        "moe": {"num_experts": 4, "layers": [1, 2], "hash_layers": [0], "expert_type": "mpo",
                "router": {"top_k": 1, "capacity_factor": 0.0, "eval_capacity_factor": 0.0},
                "mpo": {"num_tensors": 3}} if moe else {"num_experts": 0},
        "parallel": {"tensor_parallel": 1, "expert_parallel": 1},
        "data": {"data_path": [prefix], "tokenizer_model": tok, "seq_length": 32, "split": "90,10,0",
                 "cache_dir": str(run_dir.parent / "idx_cache")},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "train_steps": 10, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 2, "eval_interval": 0, "eval_iters": 2, "zero_stage": 2,
                  "save_dir": str(run_dir / "ckpt"), "log_dir": str(run_dir / "logs"), "tensorboard": False,
                  "plot": False, "seed": 7},
    }
    for k, v in over.items():
        sec, key = k.split(".", 1)
        node = cfg[sec]
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, nproc: int, overrides=(), launcher: str = "torchrun", timeout: float = 300,
           wait: bool = True, log: Path | None = None):
    """Run pretrain_moe.py under a real launcher with 1 thread per rank on CPU."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    script = str(ROOT / "pretrain" / "pretrain_moe.py")
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), script]
    elif launcher == "deepspeed":
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc),
               "--master_port", str(free_port()), script]
    else:  # plain python, one process
        cmd = [sys.executable, script]
    cmd += ["--config", str(config), *overrides]
    out = open(log, "w") if log else subprocess.PIPE
    p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT),
                         start_new_session=True)
    if not wait:
        return p
    stdout, _ = p.communicate(timeout=timeout)
    if log:
        stdout = Path(log).read_text()
    return p.returncode, stdout


def read_metrics(log_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]


def save_init(config: Path, out: Path) -> Path:
    """Build the config's model in a fresh single process and save its canonical full state dict
    (so every layout can start from the same weights via train.init_from)."""
    code = ("import sys; from megamoe.run_config import load_run_config; from megamoe import parallel;"
            "from megamoe.model.gpt import build_model; from megamoe.model.state_dict import gather_full_state_dict;"
            "from safetensors.torch import save_file;"
            "run = load_run_config(sys.argv[1]); parallel.init_parallel(run.parallel);"
            "parallel.seed_everything(run.train.seed); m = build_model(run.model, run.moe, run.parallel);"
            "save_file({k: v.contiguous() for k, v in gather_full_state_dict(m).items()}, sys.argv[2])")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code, str(config), str(out)], env=env, cwd=str(ROOT),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def train_from_init(setup: tuple[Path, Path], run_dir: Path, extra=(), nproc: int = 2) -> list[dict]:
    """Train ``setup`` = (config, init weights from :func:`save_init`) with checkpoints and logs
    under ``run_dir``; returns the train-split metrics rows."""
    cfg, init = setup
    rc, log = launch(cfg, nproc, [f"train.init_from={init}", f"train.save_dir={run_dir}/ckpt",
                                  f"train.log_dir={run_dir}/logs", *extra],
                     launcher="torchrun" if nproc > 1 else "python")
    assert rc == 0, log[-3000:]
    return [r for r in read_metrics(run_dir / "logs") if r["split"] == "train"]
