"""The exported fast tokenizer encodes like the SentencePiece model it came from."""

from __future__ import annotations

import json

import pytest

from tests.hf.common import PARAGRAPH, ROOT, train_spm

CORPUS = ROOT / "data" / "raw" / "corpus.jsonl"
EDGE = ["  leading and   repeated   spaces  ", "tabs\tand\nnewlines", "digits 0123456789 and ½ ﬁ",
        "emoji 🙂 and 東京", "", "x"]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_same_ids_as_sentencepiece(tmp_path, model_type):
    import sentencepiece as spm

    from megamoe.hf.tokenizer import build_fast_tokenizer

    model = train_spm(tmp_path / "spm.model", model_type)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok = build_fast_tokenizer(model)
    ids = tok.encode(PARAGRAPH)
    assert ids == sp.encode(PARAGRAPH) and len(ids) > 50
    assert any(sp.id_to_piece(i).startswith("<0x") for i in ids)  # byte fallback exercised
    for text in EDGE:
        assert tok.encode(text) == sp.encode(text), text
    assert tok.decode(ids) == sp.decode(ids)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == \
        (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id())


@pytest.mark.skipif(not CORPUS.is_file(), reason="the fetched corpus (tools/fetch_corpus.py) is not on this machine")
def test_corpus_paragraphs(tmp_path):
    """Paragraphs of the real corpus, with a tokenizer trained on them."""
    import sentencepiece as spm

    from megamoe.hf.tokenizer import build_fast_tokenizer

    texts = []
    with open(CORPUS, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"][:3000])
            if len(texts) == 200:
                break
    prefix = tmp_path / "c"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=1000,
                                   byte_fallback=True, minloglevel=2, hard_vocab_limit=False)
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    tok = build_fast_tokenizer(f"{prefix}.model")
    for t in texts[:50]:
        for para in t.split("\n\n")[:3]:
            assert tok.encode(para) == sp.encode(para)


def test_not_a_sentencepiece_model(tmp_path):
    from megamoe.errors import UserError
    from megamoe.hf.tokenizer import build_fast_tokenizer

    (tmp_path / "bad.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        build_fast_tokenizer(tmp_path / "bad.model")
    with pytest.raises(UserError, match="does not exist"):
        build_fast_tokenizer(tmp_path / "missing.model")
