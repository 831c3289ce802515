"""The base model that fine-tuning starts from: a native megamoe checkpoint or an HF export.

Both become a Hugging Face causal LM (stock Llama / Mixtral when exact, else the ``megamoe``
architecture): a native checkpoint is exported once into a temporary directory with
:func:`megamoe.hf.export.export_model` (the same code as tools/convert_to_hf.py), so adapters
saved on it load with ``PeftModel.from_pretrained`` on the user's own export of that checkpoint
(module names are the export's).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megamoe.errors import UserError


@dataclass
class Base:
    build: Callable[[], torch.nn.Module]  # a fresh HF model (fp32, train mode) per call
    hidden_size: int
    vocab_size: int
    description: str                      # for results: which model, its fingerprint, valid ppl
    valid_ppl: float | None
    hf_dir: Path
    run_name: str | None = None           # the pretraining config's name (``ft_base``: configs/ft_base.yaml)


def _is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def load_base(path: str | Path, tag: str | None = None) -> Base:
    """``path``: an HF export dir (config.json + *.safetensors), a training save_dir (uses
    'latest'), or one global_stepN dir."""
    import megamoe.hf  # noqa: F401  (registers the megamoe architecture with transformers)

    p = Path(path)
    if not p.exists():
        raise UserError(f"--base {path}: no such directory (a native checkpoint or an HF export dir)")
    ppl, run_name = None, None
    if _is_hf_dir(p):
        hf_dir = p
        desc = f"HF export {p}"
        marker = p / "megamoe_export.json"  # megamoe's exports say what they were made from
        if marker.is_file():
            info = json.loads(marker.read_text())
            if info.get("valid_loss") is not None:
                ppl = math.exp(info["valid_loss"])
            run_name = info.get("run_name")
            desc += f" of {info.get('source', '?')} (step {info.get('step')}, {info.get('tokens') or '?'} tokens)"
    else:
        from megamoe.hf.export import export_model
        from megamoe.hf.checkpoint_reader import load_checkpoint, model_configs

        ckpt = load_checkpoint(p, tag)
        model_cfg, moe_cfg = model_configs(ckpt.config)
        hf_dir = Path(tempfile.mkdtemp(prefix="megamoe-ft-base-")) / "hf"
        export_model(ckpt.state_dict, model_cfg, moe_cfg, hf_dir, info=ckpt.info)
        if ckpt.info.get("valid_loss") is not None:
            ppl = math.exp(ckpt.info["valid_loss"])
        desc = f"native checkpoint {ckpt.info['source']} (step {ckpt.info.get('step')})"
        run_name = ckpt.info.get("run_name")
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(hf_dir))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(hf_dir.glob("*.safetensors")))).hexdigest()
    desc += f", {cfg.architectures[0] if cfg.architectures else cfg.model_type}, weights sha256 {digest}"

    template = []

    def build():
        # loaded once, copied per run: from_pretrained costs more than a short run on a tiny base
        if not template:
            template.append(AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32))
        return copy.deepcopy(template[0]).train()

    return Base(build, cfg.hidden_size, cfg.vocab_size, desc, ppl, hf_dir, run_name)
