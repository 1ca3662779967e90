"""Tokenizers and text encoders: the tiny config's word tokenizer + small CLIP, or SD 1.5's CLIP."""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from model.vocabulary import SPECIAL_TOKENS, word_list


def build_word_tokenizer(max_length: int, words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A lower-casing word tokenizer: one token per listed word, WordPiece fallback for the rest.

    Built from :func:`model.vocabulary.word_list` with no training, so it is deterministic; saved with
    the model (``tokenizer/tokenizer.json``) and loaded from there afterwards.
    """
    words = word_list() if words is None else words
    chars = list(string.ascii_lowercase + string.digits)
    pieces = SPECIAL_TOKENS + chars + [f"##{c}" for c in chars] + words
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(pieces))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=50))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False,
                                                strip_accents=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, pad_token="[PAD]",
                                   unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")


def build_text_encoder(tokenizer: PreTrainedTokenizerFast, max_length: int, **config: object) -> CLIPTextModel:
    """A randomly initialised CLIP text transformer sized for ``tokenizer`` (causal, like CLIP)."""
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=max_length,
                                 pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **config)
    return CLIPTextModel(text_config)
