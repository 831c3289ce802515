"""Llama / Mixtral / Qwen2-MoE Hugging Face directory -> a megamoe canonical checkpoint that continues
pretraining under any TP/EP layout.

Output directory (the same layout as a training tag directory's canonical part)::

    model.safetensors     canonical full state dict (names of notes/common.md), fp32
    megamoe_config.yaml   model + moe sections (+ a train section pointing init_from here)
    tokenizer.model       copied when the HF directory ships a SentencePiece model

Continue pretraining with ``train.init_from=OUT/model.safetensors`` plus the model/moe
sections of ``megamoe_config.yaml`` (``pretrain/pretrain_moe.py --config OUT/megamoe_config.yaml
...``): the trainer builds the model for ITS layout and ``load_full_state_dict`` slices the
canonical tensors into TP/EP shards, so the import itself is layout-free.

Qwen2-MoE has biases on q/k/v only, megamoe's ``model.bias`` on every attention and dense FFN
projection: all-zero q/k/v biases (a bias-free megamoe export, a fresh transformers init) are
dropped and the model is bias-free; otherwise it imports with ``model.bias=true`` and zero
o_proj / dense-FFN biases, the same function (continued training then moves those biases too,
and an export of the result goes to the ``megamoe`` architecture once they are nonzero).

Upcycling (``upcycle``: switch | hash | mpo) turns a dense checkpoint's FFN blocks into MoE
blocks: the model is built single-process with the requested MoE config (fresh routers / hash
tables / MPO factorisation from megamoe.moe), dense weights are loaded, and every MoE block's
experts are initialised from its dense FFN by :func:`megamoe.moe.upcycle.upcycle_layer`
(copies + seeded noise; MPO: decomposition with a shared central tensor).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
import yaml

from megamoe import config as mcfg
from megamoe.errors import UserError
from megamoe.hf import configs, mapping
from megamoe.hf.checkpoint_reader import CONFIG_FILE, WEIGHTS_FILE
from megamoe.model.config import HashConfig, ModelConfig, MoEConfig, MPOConfig, RouterConfig
from megamoe.utils import atomic_path, print0, progress


def read_hf_config(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: pass a local Hugging Face model directory")
    try:
        return json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise UserError(f"{path / 'config.json'} is not valid JSON ({e})") from None


def read_hf_dir(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json + all safetensors weights of a local HF model directory."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = read_hf_config(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{path} has no model.safetensors (or index); only safetensors checkpoints are read "
                        "(re-save a .bin checkpoint with save_pretrained(safe_serialization=True))")
    sd = {}
    for f in progress(files, desc="reading shards", unit="file"):
        if not (path / f).is_file():
            raise UserError(f"{path / f} listed in {index.name} is missing: incomplete download")
        try:
            sd.update(load_file(str(path / f)))
        except Exception as e:  # safetensors' own error types for a damaged file
            raise UserError(f"{path / f} is not a readable safetensors file ({str(e)[:200]}); the download or "
                            "export is damaged: fetch or export it again") from None
    from megamoe.hf.export import verify_export

    verify_export(path, sd)
    return cfg, sd


def import_hf(path: str | Path) -> tuple[ModelConfig, MoEConfig, dict[str, torch.Tensor]]:
    """-> (model config, moe config, canonical fp32 state dict) without upcycling."""
    # the config is checked before any weights are read (a refusal costs no checkpoint load)
    arch, model_cfg, moe_cfg = configs.from_hf_config(read_hf_config(path), str(Path(path) / "config.json"))
    _, hf_sd = read_hf_dir(path)
    if model_cfg.tie_embeddings:
        hf_sd.pop("lm_head.weight", None)  # stored tied copies are the embedding itself
    sd = mapping.from_hf(hf_sd, arch)
    if arch == "qwen2_moe":
        model_cfg, sd = _qwen2_moe_biases(model_cfg, moe_cfg, sd)
    return model_cfg, moe_cfg, sd


def _qwen2_moe_biases(model_cfg: ModelConfig, moe_cfg: MoEConfig, sd: dict[str, torch.Tensor]):
    """Qwen2-MoE q/k/v biases -> megamoe's one bias switch (see the module docstring)."""
    qkv = [k for k in sd if k.endswith(".bias")]
    if not any(bool(sd[k].any()) for k in qkv):
        return model_cfg, {k: v for k, v in sd.items() if k not in qkv}
    if qkv and len(qkv) != 3 * model_cfg.num_layers:
        raise UserError(f"q/k/v biases in only {len(qkv) // 3} of {model_cfg.num_layers} blocks: not a Qwen2-MoE "
                        "checkpoint transformers can load either (qkv_bias applies to every block)")
    sd = dict(sd)
    dense = set(range(model_cfg.num_layers)) - set(moe_cfg.moe_layer_indices(model_cfg.num_layers))
    for k, v in list(sd.items()):
        parts = k.split(".")
        if k.endswith("attn.o_proj.weight") or (k.endswith(".weight") and ".mlp." in k and int(parts[1]) in dense):
            sd[k[:-len("weight")] + "bias"] = torch.zeros(v.shape[0], dtype=v.dtype)
    return dataclasses.replace(model_cfg, bias=True), sd


def upcycled_moe_config(kind: str, model_cfg: ModelConfig, *, num_experts: int, every: int = 1,
                        top_k: int = 1, hash_variant: str = "random", counts_file: str | None = None,
                        mpo_num_tensors: int = 5, mpo_max_bond: int = 0) -> MoEConfig:
    layers = list(range(every - 1, model_cfg.num_layers, every))
    if kind == "switch":
        return MoEConfig(num_experts=num_experts, every=every, router=RouterConfig(top_k=top_k))
    if kind == "hash":
        return MoEConfig(num_experts=num_experts, hash_layers=layers,
                         hash=HashConfig(variant=hash_variant, counts_file=counts_file))
    if kind == "mpo":
        return MoEConfig(num_experts=num_experts, every=every, expert_type="mpo", router=RouterConfig(top_k=top_k),
                         mpo=MPOConfig(num_tensors=mpo_num_tensors, max_bond_dim=mpo_max_bond))
    raise UserError(f"--upcycle {kind!r}: choose switch, hash or mpo")


def upcycle(model_cfg: ModelConfig, moe_cfg: MoEConfig, dense_sd: dict[str, torch.Tensor], *, noise: float = 0.01,
            seed: int = 0) -> dict[str, torch.Tensor]:
    """Dense canonical state dict -> canonical state dict of the MoE model ``moe_cfg``."""
    from megamoe.model.gpt import build_model
    from megamoe.model.state_dict import gather_full_state_dict
    from megamoe.moe.upcycle import upcycle_layer

    torch.manual_seed(seed)
    model = build_model(model_cfg, moe_cfg)
    moe_layers = set(moe_cfg.moe_layer_indices(model_cfg.num_layers))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in dense_sd.items():
            layer = k.split(".")[1] if k.startswith("layers.") else None
            if layer is not None and int(layer) in moe_layers and ".mlp." in k:
                continue
            if k not in params:
                raise UserError(f"dense tensor {k!r} has no place in the upcycled model")
            params[k].copy_(v)
    for i in progress(sorted(moe_layers), desc="upcycling", unit="layer"):
        dense = {name: dense_sd[f"layers.{i}.mlp.{name}"] for name in
                 ("gate_proj.weight", "up_proj.weight", "down_proj.weight") if f"layers.{i}.mlp.{name}" in dense_sd}
        upcycle_layer(model.layers[i].moe, dense, noise=noise, seed=seed + i)
    return gather_full_state_dict(model)


def write_checkpoint(out: str | Path, model_cfg: ModelConfig, moe_cfg: MoEConfig, sd: dict[str, torch.Tensor], *,
                     source: str, tokenizer: Path | None = None, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"--output {out} already exists and is not empty; choose another directory or pass --overwrite")
    config = {"name": f"imported from {source}", "model": mcfg.to_dict(model_cfg), "moe": mcfg.to_dict(moe_cfg),
              "train": {"init_from": str((out / WEIGHTS_FILE).resolve())}}
    if tokenizer is not None:
        config["data"] = {"tokenizer_model": str((out / "tokenizer.model").resolve())}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_file({k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()},
                  str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "source": source})
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
    print0(f"wrote megamoe checkpoint {out} ({len(sd)} tensors); continue pretraining with "
           f"--config {out / CONFIG_FILE} (train.init_from points at its weights)")
    return out
