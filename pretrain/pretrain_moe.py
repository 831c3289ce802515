"""Pretrain a (MoE) decoder with DeepSpeed ZeRO: parse config -> build -> run.

    deepspeed --num_gpus 2 pretrain/pretrain_moe.py --config configs/demo.yaml [section.field=value ...]
    torchrun --nproc_per_node 2 pretrain/pretrain_moe.py --config configs/demo.yaml
    srun python pretrain/pretrain_moe.py --config configs/demo.yaml
    python pretrain/pretrain_moe.py --help-config      # every config field: type, default, meaning
    DS_ACCELERATOR=cpu ... on machines without GPUs (gloo backend)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.config_docs import HelpConfigAction  # noqa: E402
from megamoe.errors import cli_main  # noqa: E402


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML (configs/*.yaml)")
    p.add_argument("--help-config", action=HelpConfigAction,
                   help="print every config section and field (type, default, allowed values, meaning) and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher (also read from $LOCAL_RANK)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.train_steps=10")
    args = p.parse_args(argv)

    from megamoe.run_config import load_run_config
    from megamoe.train.trainer import Trainer, print_summary

    run = load_run_config(args.config, args.overrides)
    trainer = Trainer(run)
    result = trainer.fit()
    print_summary(result)
    from megamoe.parallel import destroy_parallel

    destroy_parallel()
    return 0


if __name__ == "__main__":
    main()
