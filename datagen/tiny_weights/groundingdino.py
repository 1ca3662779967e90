"""Tiny random GroundingDINO in the official on-disk formats.

``build(out_dir)`` writes

* ``bert-tiny-uncased/``: a BERT folder as ``save_pretrained`` writes bert-base-uncased (config.json,
  model.safetensors, vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json), with
  a 1-layer, 32-wide BertModel and a vocabulary from a small word list plus every letter and
  ``##letter`` so any lower-case word tokenizes without [UNK];
* ``GroundingDINO_tiny.py``: the official config's keys, with small values, a 1-block-per-stage
  16-wide Swin (``backbone_overrides``) and 1 encoder / 1 decoder layer; hidden_dim stays 256;
* ``groundingdino_tiny.pth``: ``{"model": state_dict}`` of that model, random init (seed 0).

The stage loads them with the same code as the real files. About 10 MB in all.
"""

from __future__ import annotations

import json
from pathlib import Path

CHECKPOINT = "groundingdino_tiny.pth"
CONFIG = "GroundingDINO_tiny.py"
TEXT_ENCODER = "bert-tiny-uncased"
SEED = 0

# Special tokens first, in BERT's order of roles; then punctuation GroundingDINO treats specially.
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_PUNCT = [".", ",", "?", "!", "'", "-", "(", ")", ":", ";", "&", "/"]
_WORDS = """
a an the and of in on at with by for to from near under over behind beside front top bottom left right
is are sits sitting stands standing lying holding next small large big little old new tall short
red green blue yellow orange purple pink brown black white gray grey gold silver dark light bright
cat dog bird horse cow sheep person man woman boy girl child people car bus truck bike bicycle boat
train plane tree flower grass sky cloud sun moon water sea river lake beach sand road street house
building window door wall floor table chair sofa bed lamp cup mug bottle glass plate bowl vase book
phone laptop ball toy hat shirt dress shoe bag umbrella clock picture painting sign box apple banana
orange cake pizza sandwich circle square triangle star heart shape background scene photo image
""".split()

CONFIG_TEXT = '''"""Tiny GroundingDINO for tests: the keys of GroundingDINO_SwinT_OGC.py, small values."""
batch_size = 1
modelname = "groundingdino"
backbone = "swin_T_224_1k"
# Not an upstream key: the stage's loader passes these to the Swin builder (a 16-wide Swin).
backbone_overrides = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 4], "window_size": 7}
position_embedding = "sine"
pe_temperatureH = 20
pe_temperatureW = 20
return_interm_indices = [1, 2, 3]
backbone_freeze_keywords = None
enc_layers = 1
dec_layers = 1
pre_norm = False
dim_feedforward = 128
hidden_dim = 256
dropout = 0.0
nheads = 8
num_queries = 50
query_dim = 4
num_patterns = 0
num_feature_levels = 4
enc_n_points = 2
dec_n_points = 2
two_stage_type = "standard"
two_stage_bbox_embed_share = False
two_stage_class_embed_share = False
transformer_activation = "relu"
dec_pred_bbox_embed_share = True
dn_box_noise_scale = 1.0
dn_label_noise_ratio = 0.5
dn_label_coef = 1.0
dn_bbox_coef = 1.0
embed_init_tgt = True
dn_labelbook_size = 2000
max_text_len = 256
text_encoder_type = "bert-base-uncased"
use_text_enhancer = True
use_fusion_layer = True
use_checkpoint = True
use_transformer_ckpt = True
use_text_cross_attention = True
text_dropout = 0.0
fusion_dropout = 0.0
fusion_droppath = 0.1
sub_sentence_present = True
'''


def vocabulary() -> list[str]:
    """The tiny WordPiece vocabulary: specials, punctuation, letters, digits, ##pieces, words."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    pieces = [f"##{c}" for c in letters + digits]
    vocab: list[str] = []
    for tok in _SPECIAL + _PUNCT + letters + digits + pieces + _WORDS:
        if tok not in vocab:
            vocab.append(tok)
    return vocab


# The tiny BertModel; max_position_embeddings stays bert-base's 512 (GroundingDINO feeds up to 256 tokens).
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 512}


def build_text_encoder(out_dir: Path, name: str = TEXT_ENCODER, sizes: dict | None = None) -> Path:
    """A ``bert-base-uncased``-style folder (tokenizer + random BertModel) ``out_dir/name`` with the
    tiny vocabulary; ``sizes`` are BertConfig sizes (default the tiny ones; ``{}`` is bert-base's)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in vocab))
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), pad_token_id=vocab.index("[PAD]"),
                        **(TINY_BERT if sizes is None else sizes))
    torch.manual_seed(SEED)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def build(out_dir: Path) -> dict[str, Path]:
    """Write the tiny config, BERT folder and checkpoint; returns their paths by role."""
    import torch

    from datagen.stages.models.groundingdino import build_model, read_config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text_encoder = build_text_encoder(out_dir)
    config = out_dir / CONFIG
    config.write_text(CONFIG_TEXT)
    torch.manual_seed(SEED)
    model = build_model(read_config(config), text_encoder)
    checkpoint = out_dir / CHECKPOINT
    torch.save({"model": model.state_dict()}, checkpoint)
    return {"checkpoint": checkpoint, "config": config, "text_encoder": text_encoder}


if __name__ == "__main__":
    import sys

    paths = build(Path(sys.argv[1] if len(sys.argv) > 1 else "weights/tiny"))
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
