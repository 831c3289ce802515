"""Train/valid/test GPT datasets over blended Megatron indexed datasets, and their loader.

API the training code calls::

    from megamoe.data import build_datasets, build_loader
    train_ds, valid_ds, test_ds = build_datasets(run.data, train_samples, valid_samples,
                                                 test_samples, model_vocab_size=run.model.vocab_size)
    loader = build_loader(train_ds, micro_batch_size, global_batch_size, dp_rank, dp_size,
                          consumed_samples)
    for batch in loader:   # dict: input_ids [B,S] int64, labels [B,S] int64, loss_mask [B,S] float32
        ...

``build_datasets`` hands the blend, split, sequence length and seed to megatron-core's
``BlendedMegatronDatasetBuilder`` with ``GPTDataset`` (documents are concatenated and cut
into ``seq_length + 1``-token windows; ``labels`` are the inputs shifted by one). Before
that it checks what megatron-core would otherwise turn into asserts, garbage or an endless
loop: every prefix exists and is intact, all prefixes share one tokenizer, the tokenizer's
vocabulary fits the model's, and each split that is asked for samples holds at least one
sequence. A split with 0 requested samples is returned as None.

Trap: megatron-core splits by *sequences* of the indexed dataset (documents, unless built
with ``--split-sentences``), so a tiny dataset with ``split=969,30,1`` can leave valid/test
empty; the check says so. Indices are cached under ``data.cache_dir``; with
torch.distributed initialised, rank 0 builds them first (megatron-core's barrier).
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock
from pathlib import Path

import numpy as np
import torch

from megamoe.data.config import DataConfig
from megamoe.data.indexed import check_files, read_meta, tokenizer_path_from_meta, verify_files
from megamoe.data.sampler import ResumableBatchSampler
from megamoe.data.tokenizer import load_sentencepiece, sha256_file
from megamoe.errors import UserError

# (megatron-core's import-time warnings are filtered precisely in megamoe/utils.py)
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_config import (  # noqa: E402
    convert_split_vector_to_split_matrix, parse_and_normalize_split)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402
from megatron.core.tokenizers import MegatronTokenizerBase  # noqa: E402

_SPLITS = ("train", "valid", "test")


class SentencePieceTokenizer(MegatronTokenizerBase):
    """megatron-core's tokenizer interface over a SentencePiece model (EOD = eos).

    ``GPTDataset`` only reads ``eod``, ``pad`` and ``vocab_size``; megatron-core's own
    SentencePiece wrapper wants a tokenizer-metadata directory layout we do not need.
    """

    def __init__(self, model_path: str | Path):
        self.sp = load_sentencepiece(model_path)
        super().__init__(str(model_path), {"library": "sentencepiece"})
        self.model_path = str(model_path)
        # megatron-core hashes this into its index-cache file names
        self.unique_identifiers = {"class": type(self).__name__, "sha256": sha256_file(model_path)}
        if self.sp.eos_id() < 0:
            raise UserError(f"tokenizer model {model_path} has no eos (</s>) piece; megamoe uses it "
                            "as the end-of-document token; retrain with eos_id >= 0")

    def tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.EncodeAsIds(text), dtype=np.int64)

    def detokenize(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("pretraining tokenizer: no chat template")

    @property
    def vocab(self):
        return {self.sp.IdToPiece(i): i for i in range(self.vocab_size)}

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def eod(self) -> int:
        return self.sp.eos_id()

    @property
    def pad(self) -> int:
        if self.sp.pad_id() < 0:  # megatron-core then uses its own never-produced pad id
            raise AttributeError("tokenizer has no pad piece")
        return self.sp.pad_id()


def _tokenizer_for(data_cfg: DataConfig, prefixes: list[str]):
    metas = {p: read_meta(p) for p in prefixes}
    shas = {p: m["tokenizer"]["sha256"] for p, m in metas.items() if m}
    if len(set(shas.values())) > 1:
        listing = ", ".join(f"{p} ({s[:12]})" for p, s in shas.items())
        raise UserError(f"data.data_path mixes datasets built with different tokenizers: {listing}; "
                        "re-preprocess them with one --tokenizer-model")
    if data_cfg.tokenizer_model:
        path = Path(data_cfg.tokenizer_model)
    elif shas:
        p = next(iter(shas))
        path = tokenizer_path_from_meta(p, metas[p])
    else:
        raise UserError(f"no tokenizer known for {prefixes[0]} (no {prefixes[0]}.json metadata); "
                        "set data.tokenizer_model=PATH.model")
    tok = SentencePieceTokenizer(path)
    if shas and sha256_file(path) not in shas.values():
        raise UserError(f"tokenizer {path} is not the one the datasets were built with "
                        f"(sha256 differs from {next(iter(shas))}.json); fix data.tokenizer_model")
    return tok


def _split_sizes(data_cfg: DataConfig, prefixes, samples) -> None:
    """Raise UserError when a requested split of a prefix is shorter than one sequence."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(data_cfg.split))
    need = data_cfg.seq_length + 1
    for prefix in prefixes:
        lengths = np.frombuffer(Path(f"{prefix}.idx").read_bytes(), np.int32,
                                verify_files(prefix)[0], 34).astype(np.int64)
        n = len(lengths)
        for name, bookend, want in zip(_SPLITS, matrix, samples):
            if not want:
                continue
            if bookend is None:
                raise UserError(f"{want} {name} samples requested but data.split={data_cfg.split!r} "
                                f"gives the {name} split no share; change data.split")
            beg, end = int(round(bookend[0] * n)), int(round(bookend[1] * n))
            tokens = int(lengths[beg:end].sum())
            if tokens < need:
                raise UserError(
                    f"dataset {prefix}: the {name} split (sequences {beg}..{end} of {n}) holds "
                    f"{tokens} tokens, fewer than one sequence of data.seq_length+1={need}; "
                    "use more data, a smaller data.seq_length, or a data.split giving it more")


@contextlib.contextmanager
def _rank_zero_if_single_process():
    """Work around megatron-core 0.16: ``BlendedDataset._build_indices`` calls
    ``torch.distributed.get_rank()`` without checking ``is_initialized()`` when a cache
    directory is set, so blends fail in a single process. Patch only that case, only here."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    with mock.patch.object(torch.distributed, "get_rank", lambda *a, **k: 0):
        yield


def build_datasets(data_cfg: DataConfig, train_samples: int, valid_samples: int = 0,
                   test_samples: int = 0, model_vocab_size: int | None = None):
    """(train, valid, test) megatron-core datasets (BlendedDataset or GPTDataset, or None).

    ``*_samples`` are numbers of sequences to draw (megatron-core repeats epochs as needed).
    """
    prefixes, weights = data_cfg.blend()
    for p in prefixes:
        check_files(p, what="data.data_path names dataset prefix")
    tok = _tokenizer_for(data_cfg, prefixes)
    if model_vocab_size is not None and tok.vocab_size > model_vocab_size:
        raise UserError(f"tokenizer {tok.model_path} has {tok.vocab_size} pieces but "
                        f"model.vocab_size={model_vocab_size}; token ids would overflow the "
                        f"embedding: set model.vocab_size >= {tok.vocab_size}")
    samples = [train_samples, valid_samples, test_samples]
    _split_sizes(data_cfg, prefixes, samples)
    cache = data_cfg.cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "cache")
    config = GPTDatasetConfig(
        random_seed=data_cfg.seed, sequence_length=data_cfg.seq_length,
        blend=(prefixes, weights), split=data_cfg.split, path_to_cache=cache,
        tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=data_cfg.eod_mask_loss, create_attention_mask=False,
    )
    sizes = [s if s else None for s in samples]
    if weights is not None:  # megatron-core: weighted blends need a size for every built split
        sizes = [s or 0 for s in samples]
    with _rank_zero_if_single_process():
        built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return tuple(ds if want else None for ds, want in zip(built, samples))


def collate(samples: list[dict]) -> dict:
    """megatron-core sample dicts -> megamoe batch (input_ids, labels, loss_mask)."""
    return {
        "input_ids": torch.stack([s["tokens"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),
    }


def build_loader(dataset, micro_batch_size: int, global_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, consumed_samples: int = 0, num_workers: int = 0, pin_memory: bool | None = None):
    """DataLoader over this DP rank's micro-batches, starting after ``consumed_samples``.

    ``pin_memory`` (default: on when CUDA is available) puts batches in page-locked memory, so
    the trainer's ``.to(device, non_blocking=True)`` really overlaps; from pageable memory a
    "non-blocking" copy is a synchronous one.

    See :mod:`megamoe.data.sampler` for the layout; iterating ends when the dataset's samples
    run out (build the dataset with enough ``train_samples``).
    """
    sampler = ResumableBatchSampler(len(dataset), consumed_samples, micro_batch_size,
                                    global_batch_size, dp_rank, dp_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                                       persistent_workers=num_workers > 0)
