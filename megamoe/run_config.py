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
from megamoe.train.config import TrainConfig


@dataclass(kw_only=True)
class RunConfig:
    name: str = "megamoe"
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check_model_layout(self.model, self.moe, self.parallel)


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    return cfg.load(RunConfig, path, overrides)
