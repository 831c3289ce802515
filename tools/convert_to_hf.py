#!/usr/bin/env python
"""Export a megamoe checkpoint to a Hugging Face model directory.

    python tools/convert_to_hf.py --checkpoint runs/demo/checkpoints --output hf/demo
    python tools/convert_to_hf.py --checkpoint runs/demo/checkpoints --tag global_step200 \\
        --output hf/demo-bf16 --dtype bf16 --target auto

Reads any TP/EP/DP layout and ZeRO stage: the fp32 master weights, experts included, from the
checkpoint's canonical shards (megamoe/train/universal.py). Dense Llama-style models become
LlamaForCausalLM, learned top-k (k>=2) SwiGLU MoE models MixtralForCausalLM, such models with a
sigmoid-gated shared expert in every MoE block Qwen2MoeForCausalLM, everything else the
custom ``megamoe`` architecture (code shipped in the export, trust_remote_code=True). The export
appears atomically; an output directory holding a different model is refused without --overwrite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megamoe.errors import UserError, cli_main  # noqa: E402


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="training save_dir (uses 'latest'), one global_stepN directory, or a convert_from_hf output")
    p.add_argument("--tag", default=None, help="checkpoint tag inside --checkpoint, e.g. global_step200 "
                                               "(default: the one 'latest' names)")
    p.add_argument("--output", required=True, help="directory to write the Hugging Face model into")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight dtype of the export")
    p.add_argument("--target", default="auto", choices=["auto", "llama", "mixtral", "qwen2_moe", "megamoe"],
                   help="architecture; auto = the stock one that computes exactly the same, else megamoe")
    p.add_argument("--tokenizer", default=None,
                   help="SentencePiece .model to export (default: data.tokenizer_model of the run config, else "
                        "the tokenizer its datasets' PREFIX.json metadata records)")
    p.add_argument("--no-tokenizer", action="store_true", help="export without tokenizer files")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size limit (e.g. 2GB, 500MB)")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory holding another model")
    args = p.parse_args(argv)

    from megamoe.hf.export import export_model
    from megamoe.hf.checkpoint_reader import load_checkpoint, model_configs, tokenizer_of

    ckpt = load_checkpoint(args.checkpoint, args.tag)
    model_cfg, moe_cfg = model_configs(ckpt.config)
    tokenizer = None
    if not args.no_tokenizer:
        tokenizer = args.tokenizer or tokenizer_of(ckpt.config)
        if not tokenizer:
            raise UserError("no tokenizer: the run config has no data.tokenizer_model and its datasets record none "
                            "(PREFIX.json); pass --tokenizer FILE.model or --no-tokenizer")
        if not Path(tokenizer).is_file():  # relative paths are relative to the working directory
            raise UserError(f"tokenizer {tokenizer} not found; pass --tokenizer FILE.model or --no-tokenizer")
    export_model(ckpt.state_dict, model_cfg, moe_cfg, args.output, target=args.target, dtype=args.dtype,
                 tokenizer_model=tokenizer, info=ckpt.info, overwrite=args.overwrite,
                 max_shard_size=args.max_shard_size)
    return 0


if __name__ == "__main__":
    main()
