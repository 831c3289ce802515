"""Data section of the config: which indexed datasets, how they are blended and split."""

from __future__ import annotations

from dataclasses import dataclass, field

from megamoe.config import check


@dataclass(kw_only=True)
class DataConfig:
    # Megatron-style blend: [prefix] or [weight, prefix, weight, prefix, ...]
    data_path: list[str] = field(default_factory=list)
    split: str = "969,30,1"
    seq_length: int = 512
    seed: int = 1234
    tokenizer_model: str | None = None
    num_workers: int = 0

    def __post_init__(self):
        check(self.seq_length > 0, "seq_length", self.seq_length, "must be > 0")
