"""SentencePiece ``.model`` -> Hugging Face fast tokenizer with the same ids and special tokens.

Why not transformers' ``LlamaConverter``: it hard-codes ids 0/1/2 as unk/bos/eos and drops
the model's normaliser; megamoe's tokenizers put specials where the user asked and use
SentencePiece's normalisation rules. So the pipeline is assembled here from the
``tokenizers`` library's own parts, reading every choice from the model's protobuf:

- model: ``Unigram`` (scores) or ``BPE`` (merges ordered by piece score, via transformers'
  ``generate_merges``), byte fallback as trained, unk id as trained;
- normaliser: the precompiled charsmap (e.g. nmt_nfkc) -> remove extra spaces (strip, collapse
  runs) -> dummy prefix -> spaces become "▁", each step only if the model enables it;
- pre-tokeniser: split before "▁" (SentencePiece encodes word by word), digits split if trained so;
- decoder: "▁" -> space, byte fallback, drop the dummy prefix.

Control pieces (bos/eos/pad) are special added tokens and user-defined pieces plain added
tokens, as transformers does. Trap: SentencePiece never turns the *text* "<s>" into the bos id,
while a HF tokenizer matches special tokens in text; ordinary text is unaffected.
No BOS/EOS is added by ``encode``: megamoe's data pipeline adds none (it appends EOD itself).
"""

from __future__ import annotations

from pathlib import Path

from megamoe.errors import UserError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def load_proto(path: str | Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer model {str(path)!r} does not exist (a SentencePiece .model file)")
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise UserError(f"{path} is not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise UserError(f"{path} is not a SentencePiece model (no pieces)")
    return proto


def build_fast_tokenizer(spm_path: str | Path):
    """-> ``transformers.PreTrainedTokenizerFast`` equivalent to the SentencePiece model."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    proto = load_proto(spm_path)
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    byte_fallback = ts.byte_fallback
    if ts.model_type == 1:  # UNIGRAM
        tok = Tokenizer(Unigram(pieces, unk_id=ts.unk_id, byte_fallback=byte_fallback))
    elif ts.model_type == 2:  # BPE
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        skip = {p.piece for p in proto.pieces if p.type != NORMAL}
        merges = generate_merges(vocab, dict(pieces), skip_tokens=skip)
        tok = Tokenizer(BPE(vocab, merges, unk_token=proto.pieces[ts.unk_id].piece, fuse_unk=True,
                            byte_fallback=byte_fallback, dropout=None))
    else:
        raise UserError(f"{spm_path}: SentencePiece model type {ts.model_type} (word/char) is not supported; "
                        "train a 'bpe' or 'unigram' model")

    norm = []
    if ns.precompiled_charsmap:
        norm.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norm += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        norm.append(normalizers.Prepend(" "))
    if ns.escape_whitespaces:
        norm.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norm)
    pre = [pre_tokenizers.Split("▁", behavior="merged_with_next")]
    if ts.split_digits:
        pre.append(pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    dec = [decoders.Replace("▁", " ")]
    if byte_fallback:
        dec += [decoders.ByteFallback(), decoders.Fuse()]
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)

    added = [AddedToken(p.piece, normalized=False, special=p.type == CONTROL)
             for p in proto.pieces if p.type in (CONTROL, USER_DEFINED)]
    tok.add_tokens(added)

    def piece(i):
        return proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=piece(ts.unk_id), bos_token=piece(ts.bos_id), eos_token=piece(ts.eos_id),
        pad_token=piece(ts.pad_id), add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
        model_max_length=int(1e30))


def special_ids(spm_path: str | Path) -> dict[str, int | None]:
    """bos/eos/pad/unk ids of the SentencePiece model (None when disabled, i.e. -1)."""
    ts = load_proto(spm_path).trainer_spec
    return {k: (v if v >= 0 else None) for k, v in
            {"bos": ts.bos_id, "eos": ts.eos_id, "pad": ts.pad_id, "unk": ts.unk_id}.items()}


def save_tokenizer(spm_path: str | Path, out_dir: str | Path) -> dict[str, int | None]:
    build_fast_tokenizer(spm_path).save_pretrained(str(out_dir))
    return special_ids(spm_path)
