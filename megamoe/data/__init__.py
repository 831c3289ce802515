"""Data pipeline: raw corpus -> SentencePiece tokenizer -> Megatron indexed dataset -> batches.

Command-line stages live in ``tools/`` (fetch_corpus, train_tokenizer, preprocess_data,
count_tokens, bench_data). The training code uses :func:`build_datasets` and
:func:`build_loader` (see :mod:`megamoe.data.gpt`).
"""

from megamoe.data.config import DataConfig

__all__ = ["DataConfig", "build_datasets", "build_loader"]


def __getattr__(name):  # lazy: megatron-core's import takes seconds
    if name in ("build_datasets", "build_loader", "collate"):
        from megamoe.data import gpt

        return getattr(gpt, name)
    raise AttributeError(name)
