"""The top-level run configuration: composes the model, moe, parallel, data and train sections.

One YAML file under ``configs/`` describes a whole run; ``section.field=value`` overrides
change any field from the command line. Cross-section consistency (heads vs TP, experts vs
EP, ...) is checked here, naming full field paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megamoe import config as cfg
from megamoe.data.config import DataConfig
from megamoe.model.config import ModelConfig, MoEConfig, ParallelConfig, check_model_layout
from megamoe.model.pipeline_layout import check_pipeline_config
from megamoe.train.config import TrainConfig


@dataclass(kw_only=True)
class RunConfig:
    """One run: a name and the five sections below, read from one YAML file."""

    name: str = "megamoe"
    """Run name, shown in the report and the export's model card."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The decoder."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Which blocks are sparse and how they route."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / expert / sequence / pipeline parallelism (data parallelism is what remains of the world)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets, blend, split, sequence length."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, batch, precision, ZeRO, checkpoints, logging."""

    def __post_init__(self):
        check_model_layout(self.model, self.moe, self.parallel)
        check_pipeline_config(self.model, self.parallel, self.train.zero_stage, self.train.precision)


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    return cfg.load(RunConfig, path, overrides)
