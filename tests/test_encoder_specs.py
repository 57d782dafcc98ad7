"""Checks that came with the extract/encoders package: overrides parsed from the spec's field types,
the registry tables refusing taken names, and CLIP checkpoints whose projection size differs from the spec."""

import pytest
import torch

from extract import encoders as E
from extract.encoders import EncoderSpecError, get_spec, load_encoder
from pipeline.errors import PipelineError


def test_override_errors_are_pipeline_errors():
    """A bad --encoder-option is a user error: the CLIs print it as one line."""
    for name, overrides in (("gpt2", {"pooling": "max"}), ("gpt2", {"max_tokens": "many"}),
                            ("resnet18", {"max_tokens": 8}), ("resnet18", {"colour": 1})):
        with pytest.raises(EncoderSpecError) as info:
            get_spec(name, **overrides)
        assert isinstance(info.value, PipelineError) and isinstance(info.value, ValueError)
    with pytest.raises(EncoderSpecError, match="max_tokens > 2"):  # no room for text between [CLS] and [SEP]
        load_encoder(get_spec("tiny-bert", max_tokens=2))


def test_overrides_follow_field_types():
    assert get_spec("gpt2", max_tokens=" 12 ").prep.max_tokens == 12  # int fields accept digit strings
    assert get_spec("gpt2", revision=None).revision is None  # str | None fields accept None
    assert get_spec("gpt2", weights="  org/other ").weights == "org/other"
    with pytest.raises(EncoderSpecError, match="revision=''"):
        get_spec("gpt2", revision="")
    with pytest.raises(EncoderSpecError, match="max_tokens=True"):
        get_spec("gpt2", max_tokens=True)
    assert set(E.spec.OPTIONS[E.EncoderSpec]) == {"weights", "pooling", "revision"}


def test_registry_tables_refuse_taken_names():
    with pytest.raises(ValueError, match="already taken"):
        E.register_alias("dinov2", "dinov2-small")
    with pytest.raises(ValueError, match="already taken"):
        E.register_generic("hf-text", lambda src: None)
    with pytest.raises(ValueError, match="already has a loader"):
        E.register_loader("hf-text", lambda spec, device: None)
    with pytest.raises(ValueError, match="no loader for family"):
        E.register(E.EncoderSpec("new-model", "text", "no-such-family", "org/m", 8, "mean", ("mean",),
                                 E.TextPrep(8)))
    assert "new-model" not in E.REGISTRY


def _clip_vision_config(**kw):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8, **kw)


def _clip_model(projection_dim: int):
    """A whole CLIPModel whose tower configs keep their default projection size (512)."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=E.BYTE_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=_clip_vision_config().to_dict(),
                                projection_dim=projection_dim)).eval()


def test_clip_tower_with_another_projection_size_is_refused(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(_clip_vision_config(projection_dim=24)).save_pretrained(tmp_path)
    with pytest.raises(EncoderSpecError, match=r"projects to 24-d but the spec says 16-d"):
        load_encoder(get_spec("tiny-clip-image", weights=str(tmp_path)))


def test_clip_model_checkpoint_uses_its_projection_size(tmp_path):
    """A whole CLIPModel: the towers take the model's projection size, checked against the spec."""
    _clip_model(16).save_pretrained(tmp_path / "p16")
    _clip_model(24).save_pretrained(tmp_path / "p24")
    enc = load_encoder(get_spec("tiny-clip-image", weights=str(tmp_path / "p16")))
    clip = _clip_model(16)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = clip.visual_projection(clip.vision_model(pixel_values=x).pooler_output)
    assert enc.dim == 16 and enc.source.startswith("local:")
    torch.testing.assert_close(enc(x), want, atol=1e-5, rtol=1e-4)
    for name in ("tiny-clip-image", "tiny-clip-text"):
        with pytest.raises(EncoderSpecError, match=r"24-d but the spec says 16-d") as info:
            load_encoder(get_spec(name, weights=str(tmp_path / "p24")))
        assert isinstance(info.value, PipelineError)


def test_clip_loader_refuses_a_non_clip_checkpoint(tmp_path):
    load_encoder("tiny-dinov2").model.save_pretrained(tmp_path)
    with pytest.raises(EncoderSpecError, match="Dinov2Config, not a CLIP model"):
        load_encoder(get_spec("tiny-clip-image", weights=str(tmp_path)))
