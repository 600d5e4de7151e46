"""titan's tokenizer as a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json), so an
exported model dir works with `AutoTokenizer.from_pretrained` and gives titan's token ids.

A sentencepiece BPE model becomes a `tokenizers` BPE over the same pieces: the vocabulary is the
piece list, and the merges are every split of a piece into two pieces, ranked by the merged
piece's score (sentencepiece applies the highest-scoring merge first; `tokenizers` the lowest
rank). The normaliser repeats sentencepiece's: its character map (unless `identity`), the
dummy-prefix space, and spaces written as U+2581. Byte fallback and the special pieces carry over.
A tiktoken (Llama 3 format) file is converted with transformers' own tiktoken converter.
`encode(text)` of titan equals the HF tokenizer's ids without special tokens; by default the
HF tokenizer adds BOS in front, as titan frames documents and prompts. Writing needs only the
`tokenizers` package (and transformers for a tiktoken file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from titan.interop.errors import ConversionError

SPACE = "\u2581"  # sentencepiece's visible space


def _sentencepiece_tokenizer(path: str):
    """A `tokenizers.Tokenizer` equivalent to the sentencepiece BPE model at `path`."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ConversionError(f"{path}: only sentencepiece BPE models convert to a Hugging Face tokenizer")
    spec = proto.normalizer_spec
    if spec.remove_extra_whitespaces:
        raise ConversionError(f"{path}: remove_extra_whitespaces=true has no exact Hugging Face equivalent")
    sp = spm.SentencePieceProcessor(model_file=path)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    mergeable = {p: i for p, i in vocab.items() if i not in special and not sp.is_byte(i)}
    merges = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-sp.get_score(i), i, mergeable[left], (left, right)))
    merges.sort()
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[m[-1] for m in merges], unk_token=unk,
                               byte_fallback=proto.trainer_spec.byte_fallback, fuse_unk=True))
    steps = []
    if spec.name != "identity" and spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    undo = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        undo.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(undo)
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special])
    return tok


def _tiktoken_tokenizer(path: str, specials: dict[str, int]):
    try:
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as e:
        raise ConversionError("exporting a tiktoken tokenizer needs transformers (pip install transformers)") from e
    names = [name for name, _ in sorted(specials.items(), key=lambda kv: kv[1])]
    return TikTokenConverter(vocab_file=path, extra_special_tokens=names).converted()


def tokenizers_tokenizer(tokenizer, add_bos: bool = True):
    """A `tokenizers.Tokenizer` giving titan `tokenizer`'s ids (with BOS in front by default,
    as titan frames prompts; `add_special_tokens=False` gives exactly `encode`)."""
    from tokenizers import processors

    from titan.data.tiktoken_tokenizer import TiktokenTokenizer
    from titan.data.tokenizer import SentencePieceTokenizer

    if isinstance(tokenizer, SentencePieceTokenizer):
        tok = _sentencepiece_tokenizer(tokenizer.path)
    elif isinstance(tokenizer, TiktokenTokenizer):
        tok = _tiktoken_tokenizer(tokenizer.path, tokenizer.special_tokens)
    else:
        raise ConversionError(f"cannot export a {type(tokenizer).__name__} as a Hugging Face tokenizer")
    if add_bos:
        bos = tok.id_to_token(tokenizer.bos_id)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)])
    return tok


def save_hf_tokenizer(tokenizer, out_dir: str | Path, context: Optional[int] = None,
                      chat_template: Optional[str] = None) -> list[Path]:
    """Write tokenizer.json and tokenizer_config.json (BOS/EOS/UNK, the chat template when the
    tokenizer has one) into `out_dir`: what `AutoTokenizer.from_pretrained` reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizers_tokenizer(tokenizer)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.id_to_token(tokenizer.bos_id),
        "eos_token": tok.id_to_token(tokenizer.eos_id),
        "clean_up_tokenization_spaces": False,  # titan's decode keeps text exactly
    }
    unk = getattr(tok.model, "unk_token", None)
    if unk:
        config["unk_token"] = unk
    if context:
        config["model_max_length"] = context
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"]
