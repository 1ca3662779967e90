"""A tiny random LAVIS ``blip2_opt`` caption model folder, in LAVIS's own checkpoint format.

Runs inside ``.venv-lavis`` (it imports lavis and transformers 4.26)::

    .venv-lavis/bin/python -m datagen.tiny_weights.lavis OUT_DIR

The folder has the layout the ``lavis`` caption backend reads for a real model: ``lavis_model.yaml`` (arch
``blip2_opt``, model type ``caption_coco_opt2.7b`` with size overrides), a ``bert-base-uncased/`` folder (a
2-layer BERT), ``eva_vit_g.pth`` (a 2-layer EVA ViT), an ``opt/`` Hugging Face folder (a 2-layer OPT) and
the checkpoint ``blip2_caption_opt_tiny.pth`` = ``{"model": state_dict}`` without the OPT weights, as
LAVIS's finetuned checkpoints are. The model is assembled by the backend's own loader
(:func:`datagen.stages.models.lavis.build_model`), so builder and loader cannot drift apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from datagen.tiny_weights.blip2 import _bpe_files

SEED = 4321
IMAGE_SIZE = 28  # two 14 px EVA patches a side
CHECKPOINT = "blip2_caption_opt_tiny.pth"
EVA_TINY = {"patch_size": 14, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
_BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,")


def _bert(folder: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(_BERT_VOCAB) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text('{"do_lower_case": true}\n', encoding="utf-8")
    config = BertConfig(
        vocab_size=len(_BERT_VOCAB) + 1,  # LAVIS adds a [DEC] token to the tokenizer
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForMaskedLM(config).save_pretrained(folder)


def _opt(folder: Path) -> None:
    from transformers import GPT2Tokenizer, OPTConfig, OPTForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = _bpe_files(folder)
    tok = GPT2Tokenizer(
        vocab_file=str(vocab_file),
        merges_file=str(merges_file),
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,  # as OPT's tokenizer: </s> starts every text
    )
    tok.save_pretrained(folder)
    config = OPTConfig(
        vocab_size=len(tok),
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    OPTForCausalLM(config).save_pretrained(folder)


def _eva(path: Path) -> None:
    from functools import partial

    import torch
    from lavis.models.eva_vit import VisionTransformer
    from torch import nn

    vit = VisionTransformer(
        img_size=IMAGE_SIZE,
        use_mean_pooling=False,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        **EVA_TINY,
    )
    torch.save(vit.state_dict(), path)


def build(out_dir: Path) -> dict[str, Path]:
    """Build ``out_dir/lavis-blip2-opt-tiny``; returns ``{"lavis_blip2_opt": folder}``."""
    import torch

    from datagen.stages.models.lavis import MODEL_YAML, build_model, read_spec

    folder = Path(out_dir) / "lavis-blip2-opt-tiny"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    _bert(folder / "bert-base-uncased")
    _opt(folder / "opt")
    _eva(folder / "eva_vit_g.pth")
    spec = {
        "arch": "blip2_opt",
        "model_type": "caption_coco_opt2.7b",
        "checkpoint": CHECKPOINT,
        "config": {
            "model": {
                "opt_model": "opt",
                "image_size": IMAGE_SIZE,
                "num_query_token": 4,
                "vit_precision": "fp32",
            },
            "preprocess": {"vis_processor": {"eval": {"image_size": IMAGE_SIZE}}},
        },
        "eva_vit": EVA_TINY,
    }
    (folder / MODEL_YAML).write_text(yaml.safe_dump(spec, sort_keys=False))
    # The checkpoint does not exist yet: assemble the model without it, then save what LAVIS's finetuned
    # checkpoints hold -- everything but the frozen language model, which comes from its own folder.
    model, _ = build_model(read_spec(folder), "cpu", load_weights=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("opt_model.")}
    torch.save({"model": state}, folder / CHECKPOINT)
    return {"lavis_blip2_opt": folder}


if __name__ == "__main__":
    for name, path in build(Path(sys.argv[1] if len(sys.argv) > 1 else "weights/tiny")).items():
        print(name, path)
