"""Tiny randomly initialised test encoders, one per family (timm's ``test_resnet`` idea).

``weights="random"``: built from the config below with seed ``weights.TINY_SEED``, never
downloaded, fast on CPU. They run through the same loaders and forward code as the real
entries, so tests that sweep them cover every family. Text models use the ByteTokenizer
(``preprocess.BYTE_VOCAB`` ids).
"""

from __future__ import annotations

from extract.encoders.preprocess import BYTE_VOCAB, CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from extract.encoders.registry import register
from extract.encoders.spec import EncoderSpec, ImagePrep, TextPrep, config_pairs

register(EncoderSpec(
    "tiny-resnet", "image", "tiny-resnet", "random", 512, "avg", ("avg",),
    ImagePrep(32, 32, "bilinear", IMAGENET_MEAN, IMAGENET_STD),
    config=(("layers", (1, 1, 1, 1)),), description="test model: torchvision ResNet, BasicBlock x (1,1,1,1)"))
register(EncoderSpec(
    "tiny-dinov2", "image", "hf-image", "random", 32, "cls", ("cls", "mean"),
    ImagePrep(32, 32, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    config=(("model_config_class", "Dinov2Config"),
            ("model_config", config_pairs(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               mlp_ratio=2, image_size=32, patch_size=8)))),
    description="test model: DINOv2, width 32, 2 layers, 8 px patches"))
register(EncoderSpec(
    "tiny-clip-image", "image", "clip-image", "random", 16, "cls", ("cls",),
    ImagePrep(32, 32, "bicubic", CLIP_MEAN, CLIP_STD),
    config=(("model_config_class", "CLIPVisionConfig"),
            ("model_config", config_pairs(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, patch_size=8,
                                               projection_dim=16)))),
    description="test model: CLIP vision tower, width 32, projection 16"))
register(EncoderSpec(
    "tiny-gpt2", "text", "hf-text", "random", 32, "mean", ("mean", "last"), TextPrep(16),
    config=(("model_config_class", "GPT2Config"),
            ("model_config", config_pairs(dict(n_layer=2, n_embd=32, n_head=2, n_positions=64,
                                               vocab_size=BYTE_VOCAB, bos_token_id=258, eos_token_id=258))),
            ("tokenizer", config_pairs(dict(pad_id=258, empty_id=258))),  # GPT-2 style: no specials, pad = eos
            ("max_positions", 64)),
    description="test model: GPT-2, 2 layers, width 32, byte tokenizer"))
register(EncoderSpec(
    "tiny-bert", "text", "hf-text", "random", 32, "mean", ("mean", "cls"), TextPrep(16), normalize=True,
    config=(("model_config_class", "BertConfig"),
            ("model_config", config_pairs(dict(vocab_size=BYTE_VOCAB, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64,
                                               max_position_embeddings=64, pad_token_id=256))),
            ("tokenizer", config_pairs(dict(pad_id=256, bos_id=257, eos_id=258))),  # [CLS] text [SEP]
            ("max_positions", 64)),
    description="test model: BERT, 2 layers, width 32, mean + L2 norm like sentence encoders"))
register(EncoderSpec(
    "tiny-clip-text", "text", "clip-text", "random", 16, "last", ("last",), TextPrep(16),
    config=(("model_config_class", "CLIPTextConfig"),
            ("model_config", config_pairs(dict(vocab_size=BYTE_VOCAB, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=2,
                                               max_position_embeddings=32, projection_dim=16, pad_token_id=256,
                                               bos_token_id=257, eos_token_id=258))),
            ("tokenizer", config_pairs(dict(pad_id=256, bos_id=257, eos_id=258))),  # <bos> text <eos>
            ("max_positions", 32)),
    description="test model: CLIP text tower, width 32, projection 16"))
