"""Data section of the config: which indexed datasets, how they are blended and split.

``data_path`` is a Megatron-style blend: ``[prefix]`` or ``[weight, prefix, weight, prefix,
...]`` where each prefix names ``PREFIX.bin`` / ``PREFIX.idx`` built by
``tools/preprocess_data.py`` (e.g. ``data/corpus_text_document``). Weights need not sum
to 1. ``split`` gives the train/valid/test shares of each prefix's documents (``969,30,1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megamoe.config import check


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


@dataclass(kw_only=True)
class DataConfig:
    """Which indexed datasets a run trains on, how they are blended and split."""

    data_path: list[str] = field(default_factory=lambda: ["data/corpus_text_document"])
    """Megatron-style blend: `[prefix]` or `[weight, prefix, weight, prefix, ...]` of
    tools/preprocess_data.py outputs (PREFIX.bin / PREFIX.idx); weights need not sum to 1."""
    split: str = "969,30,1"
    """train,valid,test shares of each prefix's documents."""
    seq_length: int = 512
    """Tokens per training sequence (at most model.max_position_embeddings)."""
    seed: int = 1234
    """Seed of megatron-core's document shuffle and sample order."""
    tokenizer_model: str | None = None
    """SentencePiece model; null: the tokenizer recorded in each prefix's PREFIX.json."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process)."""
    cache_dir: str | None = None
    """Where megatron-core caches its shuffle/sample indices; null: <first prefix's dir>/cache."""
    eod_mask_loss: bool = False
    """Zero the loss on end-of-document tokens."""

    def __post_init__(self):
        check(self.seq_length > 0, "seq_length", self.seq_length, "must be > 0")
        check(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0")
        check(len(self.data_path) > 0, "data_path", self.data_path,
              "must name at least one dataset prefix, e.g. [data/corpus_text_document]")
        weighted = len(self.data_path) % 2 == 0 and _is_number(self.data_path[0])
        if weighted:
            weights, prefixes = self.data_path[0::2], self.data_path[1::2]
            check(all(_is_number(w) and float(w) >= 0 for w in weights), "data_path", self.data_path,
                  "must be [prefix, ...] or [weight, prefix, weight, prefix, ...] with weights >= 0")
            check(sum(float(w) for w in weights) > 0, "data_path", self.data_path,
                  "blend weights must not all be 0")
        else:
            prefixes = self.data_path
        check(not any(_is_number(p) for p in prefixes), "data_path", self.data_path,
              "must be [prefix, ...] or [weight, prefix, weight, prefix, ...]")
        parts = self.split.replace("/", ",").split(",")
        ok = 1 <= len(parts) <= 3 and all(_is_number(p) and float(p) >= 0 for p in parts)
        check(ok and sum(float(p) for p in parts) > 0, "split", self.split,
              "must be up to 3 non-negative comma-separated shares for train,valid,test, e.g. 969,30,1")

    def blend(self) -> tuple[list[str], list[float] | None]:
        """(prefixes, weights or None) as megatron-core's ``BlendedMegatronDatasetConfig.blend``."""
        if len(self.data_path) % 2 == 0 and _is_number(self.data_path[0]):
            return list(self.data_path[1::2]), [float(w) for w in self.data_path[0::2]]
        return list(self.data_path), None
