"""Tiny random BLIP-2 and InstructBLIP folders in the Hugging Face format of Salesforce/blip2-opt-2.7b.

Both are written with ``save_pretrained`` (model, processor, tokenizers), so the caption backend loads
them with exactly the calls it uses for the real folders. The language model is a 2-layer OPT with a
byte-level BPE tokenizer made from a hand-written vocabulary; the InstructBLIP Q-Former gets a small
WordPiece tokenizer. Random weights: the captions are noise, only shapes and plumbing are real.

    python -m datagen.tiny_weights.blip2 OUT_DIR
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

SEED = 1234
IMAGE_SIZE = 32
NUM_QUERY_TOKENS = 4

# A few whole words on top of the 256 byte symbols, so that captions decode into word-like pieces.
_WORDS = ("a", "photo", "of", "the", "on", "in", "with", "and", "dog", "cat", "red", "blue", "table", "room")
_SPECIAL = ("<s>", "<pad>", "</s>", "<unk>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what a byte-level BPE vocabulary is spelt in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _bpe_files(out: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt of a byte-level BPE: ASCII bytes, plus merges that spell ``_WORDS``."""
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(_SPECIAL)}
    # Printable ASCII and newline only (LAVIS ends OPT captions at "\n"): random weights then decode to
    # readable junk instead of invalid UTF-8; other bytes encode to <unk>.
    byte_chars = _bytes_to_unicode()
    for b in [10, *range(32, 127)]:
        vocab.setdefault(byte_chars[b], len(vocab))
    merges: list[str] = []
    space = byte_chars[ord(" ")]
    for word in _WORDS:
        for spelled in (word, space + word):  # word-initial and after a space ("Ġword")
            cur = spelled[0]
            for ch in spelled[1:]:
                merge = f"{cur} {ch}"
                if merge not in merges:
                    merges.append(merge)
                cur += ch
                vocab.setdefault(cur, len(vocab))
    vocab_file, merges_file = out / "vocab.json", out / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def _lm_tokenizer(work: Path):  # -> transformers.GPT2TokenizerFast
    from transformers import GPT2TokenizerFast

    vocab_file, merges_file = _bpe_files(work)
    # OPT's conventions: </s> is both bos and eos and is prepended to every text, <pad> pads.
    return GPT2TokenizerFast(
        vocab_file=str(vocab_file),
        merges_file=str(merges_file),
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_prefix_space=False,
        add_bos_token=True,
    )


def _qformer_tokenizer(work: Path):  # -> transformers.BertTokenizerFast
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz.,?!")
    vocab += [w for w in ("write", "short", "description", "for", "image") + _WORDS if w not in vocab]
    vocab_file = work / "qformer_vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)


def _configs(vocab_size: int, bos: int, eos: int, pad: int) -> tuple[dict, dict, dict]:
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    qformer = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        cross_attention_frequency=1,
        encoder_hidden_size=32,
        vocab_size=64,
        max_position_embeddings=64,
    )
    text = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return vision, qformer, text


def _image_processor():  # -> transformers.BlipImageProcessor
    from transformers import BlipImageProcessor

    # The real BLIP-2 normalisation (CLIP mean/std) at the tiny resolution.
    return BlipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def build_blip2(out_dir: Path) -> Path:
    """A tiny ``Blip2ForConditionalGeneration`` folder (OPT language model) at ``out_dir``."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig
    from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig, Blip2VisionConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok = _lm_tokenizer(Path(tmp))
        processor = Blip2Processor(_image_processor(), tok, num_query_tokens=NUM_QUERY_TOKENS)
    image_token_id = tok.convert_tokens_to_ids("<image>")  # the processor added it: size the vocab for it
    vision, qformer, text = _configs(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    config = Blip2Config.from_vision_qformer_text_configs(
        Blip2VisionConfig(**vision),
        Blip2QFormerConfig(**qformer),
        OPTConfig(**text),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token_id,
    )
    torch.manual_seed(SEED)
    model = Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def build_instructblip(out_dir: Path) -> Path:
    """A tiny ``InstructBlipForConditionalGeneration`` folder (OPT language model) at ``out_dir``."""
    import torch
    from transformers import (
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        OPTConfig,
    )
    from transformers.models.instructblip.configuration_instructblip import (
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok = _lm_tokenizer(Path(tmp))
        qtok = _qformer_tokenizer(Path(tmp))
        processor = InstructBlipProcessor(_image_processor(), tok, qtok, num_query_tokens=NUM_QUERY_TOKENS)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision, qformer, text = _configs(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    qformer["vocab_size"] = len(qtok)  # the InstructBLIP Q-Former embeds the instruction itself
    config = InstructBlipConfig.from_vision_qformer_text_configs(
        InstructBlipVisionConfig(**vision),
        InstructBlipQFormerConfig(**qformer),
        OPTConfig(**text),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token_id,
    )
    torch.manual_seed(SEED + 1)
    model = InstructBlipForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def build(out_dir: Path) -> dict[str, Path]:
    """Build both folders under ``out_dir``: ``{"blip2": .../blip2-tiny, "instructblip": .../instructblip-tiny}``."""
    out_dir = Path(out_dir)
    return {
        "blip2": build_blip2(out_dir / "blip2-tiny"),
        "instructblip": build_instructblip(out_dir / "instructblip-tiny"),
    }


if __name__ == "__main__":
    for name, path in build(Path(sys.argv[1] if len(sys.argv) > 1 else "weights/tiny")).items():
        print(name, path)
