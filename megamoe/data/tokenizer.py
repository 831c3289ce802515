"""SentencePiece loading and the tokenizer metadata that travels with every dataset.

Kept free of megatron-core imports (they take seconds); the megatron-core tokenizer
adapter lives in :mod:`megamoe.data.gpt`. EOD is always the tokenizer's ``</s>`` (eos) id.

Metadata (``tokenizer_metadata``) is a small JSON-able dict: vocab size, unk/bos/eos/pad ids
(-1 = absent), model type, sha256 of the ``.model`` file. ``train_tokenizer.py`` writes it
as ``PREFIX.json`` and ``preprocess_data.py`` copies it into ``PREFIX_text_document.json``
so every dataset carries its tokenizer's identity.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import sentencepiece as spm

from megamoe.errors import UserError


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_sentencepiece(path: str | Path) -> spm.SentencePieceProcessor:
    """Load a ``.model`` file or raise UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer model {path} does not exist; train one with "
                        "tools/train_tokenizer.py or pass an existing SentencePiece .model")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise UserError(f"tokenizer model {path} is not a SentencePiece model ({e})") from None
    return sp


def tokenizer_metadata(path: str | Path, sp: spm.SentencePieceProcessor | None = None) -> dict:
    """Vocab size, special ids and sha256 of a SentencePiece model file."""
    sp = sp or load_sentencepiece(path)
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return {
        "type": "sentencepiece",
        "model_type": pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower(),
        "vocab_size": sp.GetPieceSize(),
        "unk_id": sp.unk_id(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "pad_id": sp.pad_id(),
        "byte_fallback": bool(proto.trainer_spec.byte_fallback),
        "sha256": sha256_file(path),
    }


def write_json(path: str | Path, data: dict) -> None:
    from megamoe.utils import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
