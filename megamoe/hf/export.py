"""Write a canonical megamoe state dict as a Hugging Face model directory.

Steps: pick the target (stock Llama / Mixtral / Qwen2-MoE when exact, else ``megamoe``) -> build its
config -> rename tensors through the declarative table (every tensor must map) -> cast ->
write config.json, generation_config.json, safetensors (sharded with an index above
``max_shard_size``, by huggingface_hub's splitter), tokenizer, custom code (megamoe type only),
README.md model card and ``megamoe_export.json`` (provenance, a sha256 per tensor, experts
included, and a fingerprint over them; :func:`verify_export` checks them when megamoe reads an
export back, e.g. tools/convert_from_hf.py).

Everything is written into a temporary sibling directory renamed onto the output only at the
end (:func:`megamoe.utils.atomic_path`): a failure leaves no half-written export. An output
directory that already holds a *different* model is refused unless ``overwrite``; the same
model (same fingerprint and config) is left alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import torch

from megamoe.errors import UserError
from megamoe.hf import configs, mapping
from megamoe.model.config import ModelConfig, MoEConfig
from megamoe.utils import atomic_path, print0, progress

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MARKER = "megamoe_export.json"
CODE_FILES = ("configuration_megamoe.py", "modeling_megamoe.py")


def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"").hexdigest()


def checksums(sd: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per tensor: sha256 of its bytes, dtype, shape (recorded in megamoe_export.json)."""
    return {k: {"sha256": tensor_sha256(v), "dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
            for k, v in sorted(sd.items())}


def fingerprint(sd: dict[str, torch.Tensor], sums: dict | None = None) -> str:
    sums = sums or checksums(sd)
    return hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()


def verify_export(path: str | Path, sd: dict[str, torch.Tensor]) -> None:
    """Check the tensors read from an export against its ``megamoe_export.json`` checksums:
    a missing, extra or altered tensor (an expert dropped or edited) is a UserError naming it.
    Exports without checksums (not written by megamoe) pass unchecked."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return
    try:
        want = json.loads(marker.read_text()).get("tensors")
    except ValueError as e:
        raise UserError(f"{marker} is not valid JSON ({e}); re-export the model") from None
    if not want:
        return
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:
        raise UserError(f"{path} does not hold the tensors {MARKER} lists: missing {missing[:5]}"
                        f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}; the export is incomplete or "
                        "was edited: re-export it with tools/convert_to_hf.py")
    for k in sorted(want):
        if tensor_sha256(sd[k]) != want[k]["sha256"]:
            raise UserError(f"{path}: tensor {k} does not match its checksum in {MARKER} (altered or damaged); "
                            "re-export the model with tools/convert_to_hf.py")


def _check_output(output: Path, fp: str, overwrite: bool) -> bool:
    """True when ``output`` already holds exactly this export (nothing to do)."""
    if not output.exists():
        return False
    if not output.is_dir():
        raise UserError(f"--output {output} exists and is not a directory")
    if not any(output.iterdir()):
        return False
    marker = output / MARKER
    same = marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fp
    if same and not overwrite:
        return True
    if not overwrite:
        what = "a different megamoe export" if marker.is_file() else "files that are not this export"
        raise UserError(f"--output {output} already holds {what}; choose another directory or pass --overwrite "
                        "to replace it")
    return False


def write_safetensors(hf_sd: dict[str, torch.Tensor], out: Path, max_shard_size: str | int) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(hf_sd, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, keys in progress(split.filename_to_tensors.items(), desc="writing shards", unit="shard"):
        save_file({k: hf_sd[k].contiguous() for k in keys}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in hf_sd.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def verify_shapes(arch: str, hf_cfg, hf_sd: dict[str, torch.Tensor]) -> None:
    """Every tensor the HF model expects is present with its shape, and nothing else: the
    weights and the config must describe the same model (catches a weights file from another
    run, or a config edited after training). The model is built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    import megamoe.hf  # noqa: F401  (registers megamoe)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if arch in ("mixtral", "qwen2_moe"):
        want = {k: tuple(v.shape) for k, v in mapping.unfuse(model.state_dict(), arch).items()}
    if getattr(hf_cfg, "tie_word_embeddings", False):
        want.pop("lm_head.weight", None)
    have = {k: tuple(v.shape) for k, v in hf_sd.items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = [f"{k} {have[k]} != {want[k]}" for k in sorted(set(want) & set(have)) if have[k] != want[k]]
    if missing or extra or wrong:
        raise UserError(f"the checkpoint's weights do not match its config ({arch}): missing {missing[:5]}, "
                        f"unexpected {extra[:5]}, wrong shapes {wrong[:5]}; were the weights and "
                        "megamoe_config.yaml written by the same run?")


def export_model(sd: dict[str, torch.Tensor], model_cfg: ModelConfig, moe_cfg: MoEConfig, output: str | Path, *,
                 target: str = "auto", dtype: str = "fp32", tokenizer_model: str | None = None,
                 info: dict | None = None, overwrite: bool = False, max_shard_size: str | int = "5GB") -> Path:
    """Export; returns the output path. ``info`` (optional): step, valid_loss, data, source, run_name."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    output, info = Path(output), dict(info or {})
    arch = configs.choose_target(target, model_cfg, moe_cfg, sd)
    tok_ids = None
    if tokenizer_model:
        from megamoe.hf.tokenizer import load_proto, special_ids

        n_pieces = len(load_proto(tokenizer_model).pieces)
        if n_pieces > model_cfg.vocab_size:
            raise UserError(f"tokenizer {tokenizer_model} has {n_pieces} pieces but model.vocab_size="
                            f"{model_cfg.vocab_size}: not the tokenizer this model was trained with")
        tok_ids = special_ids(tokenizer_model)
    hf_cfg = configs.hf_config(arch, model_cfg, moe_cfg, sd, tok_ids)
    hf_cfg.dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    if arch == "qwen2_moe":
        sd = mapping.qwen2_moe_biases(sd, model_cfg.bias)
    # the expert bias stays fp32 (a selection threshold; the modeling file keeps it fp32 too)
    hf_sd = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() and not k.endswith(".expert_bias") else v).contiguous()
             for k, v in mapping.to_hf(sd, arch).items()}
    verify_shapes(arch, hf_cfg, hf_sd)
    sums = checksums(hf_sd)
    fp = fingerprint(hf_sd, sums)
    if _check_output(output, fp, overwrite):
        print0(f"{output} already holds this export (same tensors); nothing to do")
        return output
    with atomic_path(output) as tmp:
        tmp.mkdir()
        hf_cfg.save_pretrained(str(tmp))
        _generation_config(hf_cfg).save_pretrained(str(tmp))
        write_safetensors(hf_sd, tmp, max_shard_size)
        if arch == "megamoe":
            here = Path(__file__).parent
            for name in CODE_FILES:
                shutil.copyfile(here / name, tmp / name)
        if tokenizer_model:
            from megamoe.hf.tokenizer import save_tokenizer

            save_tokenizer(tokenizer_model, tmp)
        (tmp / "README.md").write_text(model_card(arch, model_cfg, moe_cfg, dtype, info, tokenizer_model))
        (tmp / MARKER).write_text(json.dumps({"fingerprint": fp, "target": arch, "dtype": dtype,
                                              **{k: v for k, v in info.items() if _jsonable(v)}, "tensors": sums},
                                             indent=2, sort_keys=True) + "\n")
    print0(f"exported {arch} model ({len(hf_sd)} tensors, {dtype}) to {output}")
    return output


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def _generation_config(hf_cfg):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=hf_cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id,
                            pad_token_id=hf_cfg.pad_token_id)


def model_card(arch: str, m: ModelConfig, moe: MoEConfig, dtype: str, info: dict, tokenizer_model) -> str:
    from megamoe.model.accounting import account

    acc = account(m, moe)
    moe_layers = moe.moe_layer_indices(m.num_layers)
    lines = [f"# {info.get('run_name') or 'megamoe model'}", "",
             f"Exported by megamoe from `{info.get('source', 'a megamoe checkpoint')}` as **{arch}** "
             f"(`{configs.ARCHITECTURES[arch]}`), "
             f"weights in {dtype}.", "", "## Architecture", "",
             f"- decoder: {m.num_layers} blocks, width {m.hidden_size}, {m.num_heads} heads "
             f"({m.kv_heads} key/value heads), FFN {m.ffn_hidden_size} ({m.activation}), {m.norm}, "
             f"{m.position_embedding} positions (max {m.max_position_embeddings}), vocabulary {m.vocab_size}, "
             f"{'tied' if m.tie_embeddings else 'untied'} embeddings, {'with' if m.bias else 'no'} biases"]
    if moe_layers:
        hash_l = [i for i in moe_layers if i in moe.hash_layers]
        learned = [i for i in moe_layers if i not in moe.hash_layers]
        lines.append(f"- MoE: {moe.num_experts} experts of width {moe.expert_ffn_hidden_size or m.ffn_hidden_size} "
                     f"in blocks {moe_layers}")
        if learned:
            r = moe.router
            cap = ", ".join(f"{what} {'dropless' if f <= 0 else f'capacity factor {f}'}"
                            for what, f in (("training", r.capacity_factor), ("eval", r.eval_capacity_factor)))
            lines.append(f"  - learned top-{r.top_k} router in blocks {learned} ({moe.expert_type} experts); "
                         f"{cap}; **inference here is dropless** (every token reaches its top-k experts)")
        if hash_l:
            h = moe.hash
            lines.append(f"  - hash routing ({h.variant}, {h.num_hashes} hash(es)) in blocks {hash_l} "
                         f"({h.expert_type} experts); tables stored as `router.table` tensors")
        if moe.shared_experts:
            lines.append(f"  - {moe.shared_experts} shared expert(s) of width "
                         f"{moe.shared_expert_ffn_hidden_size or moe.expert_ffn_hidden_size or m.ffn_hidden_size} in "
                         f"every MoE block{', scaled by a sigmoid gate' if moe.shared_expert_gate else ''}")
        if "mpo" in (moe.expert_type, moe.hash.expert_type):
            mp = moe.mpo
            lines.append(f"  - MPO experts: {mp.num_tensors} local tensors, central tensor shared per layer, "
                         f"max bond {mp.max_bond_dim or 'exact'}")
    else:
        lines.append("- dense (no MoE blocks)")
    lines += ["", "## Parameters", "", f"- total: {acc.total:,} ({configs.human(acc.total)})",
              f"- active per token: {acc.active:,} ({configs.human(acc.active)})", "", "## Training", ""]
    lines.append(f"- steps: {info['step']}" if info.get("step") is not None else "- steps: unknown")
    if info.get("tokens") is not None:
        lines.append(f"- tokens: {info['tokens']:,}")
    lines.append(f"- data: {info['data']}" if info.get("data") else "- data: not recorded")
    if tokenizer_model:
        lines.append(f"- tokenizer: SentencePiece `{Path(tokenizer_model).name}` (exported as a fast tokenizer)")
    vl = info.get("valid_loss")
    if vl is not None:
        lines.append(f"- final validation loss {vl:.4f}, perplexity {math.exp(vl):.2f}")
    else:
        lines.append("- final validation perplexity: not recorded in the checkpoint")
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f"model = AutoModelForCausalLM.from_pretrained(path{', trust_remote_code=True' if arch == 'megamoe' else ''})",
              "tok = AutoTokenizer.from_pretrained(path)", "```", ""]
    if arch == "megamoe":
        lines += ["`megamoe` is a custom architecture: its code ships in this directory "
                  "(`trust_remote_code=True`); with the `megamoe` package imported no remote code is needed.", ""]
    return "\n".join(lines)
