"""export / AlignedModel.from_pretrained: a run's model as a folder that loads with no cache (in a
fresh process, after the cache and the original weights are deleted) and gives the same
embeddings; edited files, missing or other encoder weights are refused with what to do.

Encoders with real (local, non-random) weights, small and made here: MobileNetV2 (random init,
saved as a .pth) at 32 px and a tiny GPT-2 in a transformers folder with a word-level tokenizer."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from aligned import AlignedError, AlignedModel, export, verify_folder
from aligned.cli import main as export_cli
from extract.encoders import load_encoder
from extract.run import extract
from pipeline.config import load_config
from tests.fixtures import COLORS, SUBJECTS, WORDS, make_imagefolder
from train.fit import fit_adapters

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a red dog", "two friends near the old river", "a boat"]


def _mobilenet(seed: int):
    """A random MobileNetV2 whose batch-norm statistics were set on random images: a freshly
    initialised one gives features of about 1e-10 in eval mode (nothing to align)."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v2()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the statistics of this one batch
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 32, 32))
    return model.eval()


def _weights(root: Path) -> tuple[Path, Path]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.save(_mobilenet(1).state_dict(), root / "cnn.pth")
    text = root / "text"
    load_encoder("tiny-gpt2").model.save_pretrained(text)
    words = ["<pad>", "<unk>", "<eos>", *sorted({w.lower() for w in (*WORDS, *SUBJECTS, *COLORS, "an", "a")})]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(text)
    return root / "cnn.pth", text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(cache, run name, data, images, weights folder) of a run on locally stored weights."""
    root = tmp_path_factory.mktemp("export")
    (root / "weights").mkdir()
    cnn, text = _weights(root / "weights")
    data = make_imagefolder(root / "data", n=4)
    text_name = f"hf-text:{text}"
    opts = {"data.dataset": "imagefolder", "data.data_dir": str(data), "data.cache": str(root / "cache"),
            "data.captions": "first", "extract.encoders": ("mobilenet_v2", text_name), "extract.workers": 0,
            "extract.encoder_options": {"mobilenet_v2": {"weights": str(cnn), "image_size": 32},
                                        text_name: {"max_tokens": 16}},
            "train.image": "mobilenet_v2", "train.text": text_name, "train.reference": "", "train.dim": 8,
            "train.epochs": 2, "train.batch_size": 4, "train.device": "cpu", "train.name": "w"}
    cfg = load_config(None, options=opts)
    extract(cfg)
    fit_adapters(cfg, progress=False)
    images = sorted(str(p) for p in (data / "test").rglob("*.png"))
    return root / "cache", "w", data, images, root / "weights"


def _fresh_process(folders: list[Path], images: list[str], out: Path) -> list[dict]:
    """Load each folder with from_pretrained in a new interpreter; returns the embeddings."""
    code = ("import json, sys, numpy as np\nfrom aligned import AlignedModel\n"
            "folders, images, texts, out = json.loads(sys.argv[1])\n"
            "for i, f in enumerate(folders):\n"
            "    m = AlignedModel.from_pretrained(f, device='cpu')\n"
            "    np.save(f'{out}/img{i}.npy', m.embed_images(images, workers=0, progress=False))\n"
            "    np.save(f'{out}/txt{i}.npy', m.embed_texts(texts, progress=False))\n")
    arg = json.dumps([[str(f) for f in folders], images, TEXTS, str(out)])
    res = subprocess.run([sys.executable, "-c", code, arg], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                              "PATH": "/usr/bin:/bin"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return [{"img": np.load(out / f"img{i}.npy"), "txt": np.load(out / f"txt{i}.npy")} for i in range(len(folders))]


def test_export_loads_in_a_fresh_process_without_cache_or_weights(trained, tmp_path):
    cache, run, _, images, weights = trained
    copy = tmp_path / "cache"  # deleted below: the exports must not need it
    shutil.copytree(cache, copy)
    model = AlignedModel.from_run(run, cache=copy, device="cpu")
    img, txt = model.embed_images(images, workers=0, progress=False), model.embed_texts(TEXTS, progress=False)
    plain = export(run, tmp_path / "plain", cache=copy)
    full = export(run, tmp_path / "full", cache=copy, include_weights=True)
    listed = verify_folder(full)
    assert {"config.json", "adapters.safetensors", "README.md", "encoders/image/model.safetensors",
            "encoders/text/model.safetensors"} <= set(listed)
    config = json.loads((plain / "config.json").read_text())
    assert config["dim"] == 8 and config["temperature"] == pytest.approx(0.07)
    assert config["encoders"]["image"]["weights"]["included"] is None
    assert not any(p.suffix in (".pth", ".pt", ".bin", ".pkl") for p in full.rglob("*"))  # no pickles shipped
    shutil.rmtree(copy)
    moved = weights.with_name("weights-away")
    weights.rename(moved)  # the original encoder weights are gone too: only the full export can load
    try:
        with pytest.raises(AlignedError, match="not in the folder .* not on this machine"):
            AlignedModel.from_pretrained(plain, device="cpu")
        (out,) = _fresh_process([full], images, tmp_path)
    finally:
        moved.rename(weights)
    np.testing.assert_allclose(out["img"], img, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["txt"], txt, rtol=0, atol=1e-6)
    again = AlignedModel.from_pretrained(plain, device="cpu")  # weights back where the registry finds them
    np.testing.assert_allclose(again.embed_texts(TEXTS, progress=False), txt, rtol=0, atol=1e-6)
    assert again.fingerprint == model.fingerprint == AlignedModel.from_pretrained(full, device="cpu").fingerprint


def test_edited_or_missing_files_and_other_weights_are_refused(trained, tmp_path):
    cache, run, _, _, weights = trained
    folder = export(run, tmp_path / "m", cache=cache, include_weights=True)
    readme = folder / "README.md"
    readme.write_text(readme.read_text() + "edited\n")
    with pytest.raises(AlignedError, match="README.md was modified after export"):
        AlignedModel.from_pretrained(folder, device="cpu")
    folder = export(run, folder, cache=cache, include_weights=True)  # an export is replaced in place
    (folder / "encoders/text/model.safetensors").unlink()
    with pytest.raises(AlignedError, match="encoders/text/model.safetensors .* is missing"):
        AlignedModel.from_pretrained(folder, device="cpu")
    plain = export(run, tmp_path / "plain", cache=cache)
    saved = (weights / "cnn.pth").read_bytes()
    try:
        torch.save(_mobilenet(2).state_dict(), weights / "cnn.pth")
        with pytest.raises(AlignedError, match="not the ones this model was exported with"):
            AlignedModel.from_pretrained(plain, device="cpu")
    finally:
        (weights / "cnn.pth").write_bytes(saved)
    with pytest.raises(AlignedError, match="not an exported aligned model"):
        AlignedModel.from_pretrained(tmp_path / "nothing", device="cpu")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(AlignedError, match="non-empty folder that is not an exported model"):
        export(run, tmp_path / "busy", cache=cache)


def test_export_cli(trained, tmp_path):
    cache, run, _, _, _ = trained
    res = CliRunner().invoke(export_cli, ["--run", run, "--cache", str(cache), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "from_pretrained" in res.output and (tmp_path / "out" / "SHA256SUMS").is_file()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Held-out retrieval" in card and "infonce" in card and "Not available" in card  # no analysis yet
    res = CliRunner().invoke(export_cli, ["--run", "nope", "--cache", str(cache), str(tmp_path / "x")])
    assert res.exit_code == 1 and res.output.startswith("Error: No run folder") and res.output.count("\n") == 1
