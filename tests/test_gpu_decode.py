"""extract.decode: the GPU JPEG path (extract.gpu_decode) against the CPU (PIL) path.

Without CUDA the GPU path runs on CPU tensors (torchvision's libjpeg decode instead of nvJPEG):
that checks the worker-side JPEG parser, the orientation, the tensor resize/crop recipe, the
batch merge and the fallbacks; the decoder in the cache key is checked without running it.
The CUDA-only test compares real nvJPEG features with CPU-decoded ones.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw, ImageFilter

import extract.run as run
from extract import datasets as D
from extract import gpu_decode as G
from extract.cli import main as extract_cli
from extract.encoders import IMAGENET_MEAN, IMAGENET_STD, ImagePrep, get_spec, image_pixels, resize_crop
from extract.loader import Batch, Encoded, EncodedImage, Unreadable
from pipeline.config import ConfigError, load_config
from pipeline.errors import PipelineError
from similarity.metrics import cka
from tests.fixtures import make_flickr30k, make_hf_dataset, write_bad_images

ROOT = Path(__file__).resolve().parents[1]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs CUDA (nvJPEG); run benchmarks/gpu_check.sh on a GPU machine")


# ----------------------------------------------------------------------------- generated images

def photo_like(rng: np.random.Generator, w: int, h: int, gray: bool = False) -> Image.Image:
    """A photo-like image: smooth colour field, a few soft-edged shapes, fine texture and noise
    (edges and texture are where JPEG decoders and resamplers differ)."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([rng.uniform(40, 200) + rng.uniform(-60, 60) * np.sin(rng.uniform(1, 6) * x + rng.uniform(0, 3))
                     + rng.uniform(-50, 50) * y for _ in range(3)], -1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        box = (x0, y0, x0 + rng.uniform(10, w / 2), y0 + rng.uniform(10, h / 2))
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(1.0))
    a = np.asarray(img).astype(np.float32) + rng.normal(0, 6, (h, w, 3)) + 10 * np.sin(x * 300)[..., None]
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return img.convert("L") if gray else img


def jpeg_bytes(img: Image.Image, orientation: int | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    img.save(buf, "JPEG", quality=kw.pop("quality", 90), **kw)
    return buf.getvalue()


def make_photo_folder(root: Path, n: int = 12, seed: int = 0, extra: dict[str, bytes] | None = None) -> Path:
    """An imagefolder split "test" of photo-like JPEGs: sizes 500x375, 375x500, 333x251, 640x480; every
    EXIF orientation; gray, progressive and 4:4:4 ones; plus ``extra`` {file name: bytes}."""
    rng = np.random.default_rng(seed)
    folder = root / "test"
    folder.mkdir(parents=True)
    sizes = ((500, 375), (375, 500), (333, 251), (640, 480))
    files = {}
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        kw = {"progressive": True} if i % 5 == 3 else {"subsampling": 0} if i % 5 == 4 else {}
        img = photo_like(rng, w, h, gray=i % 6 == 5)
        files[f"p{i:03d}.jpg"] = jpeg_bytes(img, orientation=1 + i % 8 if i % 3 else None, **kw)
    files.update(extra or {})
    lines = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        lines.append(json.dumps({"file_name": name, "caption": [f"image {name}"]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _cfg(data_dir, cache, encoders=("tiny-resnet",), **extract_opts):
    opts = {"data.data_dir": str(data_dir), "data.cache": str(cache), "data.dataset": "imagefolder",
            "extract.encoders": tuple(encoders), "extract.split": "test", "extract.workers": 0,
            "extract.batch_size": 4, "extract.chunk_rows": 8}
    opts.update({f"extract.{k}": v for k, v in extract_opts.items()})
    return load_config(ROOT / "pipeline.toml", options=opts)


@pytest.fixture
def gpu_path_on_cpu(monkeypatch):
    """Run the GPU decode path with CPU tensors: the decoder choice says gpu-nvjpeg, GpuDecoder
    decodes on the model's device (CPU here, torchvision's libjpeg)."""
    monkeypatch.setattr(run, "effective_decoder", lambda decode, device, computing=True:
                        G.GPU_NVJPEG if decode != "cpu" else G.CPU)


def _rows(entry) -> dict[str, np.ndarray]:
    return dict(zip(entry.ids, entry.features()))


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ----------------------------------------------------------------------------- which decoder, cache key

def test_effective_decoder():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # constructing a cuda device needs no CUDA
    assert G.effective_decoder("auto", cpu) == "cpu" and G.effective_decoder("cpu", cpu) == "cpu"
    assert G.effective_decoder("auto", cuda) == "gpu-nvjpeg" and G.effective_decoder("gpu", cuda) == "gpu-nvjpeg"
    assert G.effective_decoder("cpu", cuda) == "cpu"
    with pytest.raises(ConfigError, match="decode=gpu.*runs on cpu.*--decode auto.*--decode cpu"):
        G.effective_decoder("gpu", cpu)
    assert G.effective_decoder("gpu", cpu, computing=False) == "gpu-nvjpeg"  # merge decodes nothing
    with pytest.raises(ConfigError, match="auto, cpu, gpu"):
        G.effective_decoder("nvjpeg", cpu)
    assert isinstance(ConfigError("x"), PipelineError)


def test_the_key_records_the_gpu_decoder_and_cpu_keys_stay_as_before(tmp_path):
    data = make_flickr30k(tmp_path / "data", n_per_split=(2, 2, 3))
    cfg = load_config(ROOT / "pipeline.toml", options={"data.data_dir": str(data), "data.cache": str(tmp_path)})
    split = D.load_split("flickr30k", data, "test")
    image, text = get_spec("tiny-resnet"), get_spec("tiny-gpt2")
    content = run._content(cfg, split)
    _, ids, before = run._entry_request(cfg, split, image, content)  # the default: what every cache so far recorded
    _, _, cpu = run._entry_request(cfg, split, image, content, G.effective_decoder("auto", torch.device("cpu")))
    _, _, gpu = run._entry_request(cfg, split, image, content, G.effective_decoder("auto", torch.device("cuda")))
    assert cpu == before and "decode" not in cpu  # auto on a CPU machine: today's key, old caches stay fresh
    assert gpu == {**cpu, "decode": "gpu-nvjpeg"} and gpu != cpu
    assert set(before) == {"entry", "encoder", "dataset", "split", "fingerprint", "data_dir", "content",
                           "cache_format", "precision", "layers"}
    for decoder in ("cpu", "gpu-nvjpeg"):  # text entries do not depend on the image decoder
        assert (run._entry_request(cfg, split, text, content, decoder)[2]
                == run._entry_request(cfg, split, text, content)[2])


def test_decode_gpu_without_cuda_is_refused_before_any_work(tmp_path):
    data = make_photo_folder(tmp_path / "data", n=2)
    with pytest.raises(ConfigError, match="decode=gpu"):
        run.extract(_cfg(data, tmp_path / "c", decode="gpu", device="cpu"))
    assert not (tmp_path / "c").exists()
    res = CliRunner().invoke(extract_cli, ["--encoder", "tiny-resnet", "--dataset", "imagefolder", "--data-dir",
                                           str(data), "--cache", str(tmp_path / "c"), "--split", "test",
                                           "--device", "cpu", "--decode", "gpu"])
    assert res.exit_code != 0 and "extract.decode=gpu" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "c").exists()
    res = CliRunner().invoke(extract_cli, ["--encoder", "tiny-resnet", "--decode", "nvjpeg"])
    assert res.exit_code == 2 and "auto" in res.output


def test_auto_on_cpu_reuses_a_cpu_cache_and_a_gpu_cache_is_stale_for_cpu(tmp_path, monkeypatch):
    data = make_photo_folder(tmp_path / "data", n=3)
    (first,) = run.extract(_cfg(data, tmp_path / "c", decode="cpu"))
    (again,) = run.extract(_cfg(data, tmp_path / "c", decode="auto"))  # same key: reused, not stale
    assert again.key == first.key and "decode" not in first.key
    monkeypatch.setattr(run, "effective_decoder", lambda *a, **k: G.GPU_NVJPEG)
    with pytest.raises(PipelineError, match="decode: cached None vs requested 'gpu-nvjpeg'"):
        run.extract(_cfg(data, tmp_path / "c", decode="gpu"))


# ----------------------------------------------------------------------------- the worker-side parser

def _twice_exif(data: bytes) -> bytes:
    """``data`` with its EXIF APP1 segment repeated (PIL joins such blocks)."""
    at = data.index(b"\xff\xe1")
    segment = data[at:at + 2 + int.from_bytes(data[at + 2:at + 4], "big")]
    assert segment[4:10] == b"Exif\x00\x00"
    return data[:at] + segment + data[at:]


def test_jpeg_orientation_accepts_plain_jpegs_and_routes_the_rest_to_the_cpu(tmp_path):
    rng = np.random.default_rng(1)
    img = photo_like(rng, 64, 48)
    plain = jpeg_bytes(img)
    assert G.jpeg_orientation(plain) == 1
    for o in range(1, 9):
        assert G.jpeg_orientation(jpeg_bytes(img, orientation=o)) == o
    assert G.jpeg_orientation(jpeg_bytes(img, orientation=0)) == 1  # out of range: PIL leaves it as stored
    assert G.jpeg_orientation(jpeg_bytes(img.convert("L"))) == 1
    assert G.jpeg_orientation(jpeg_bytes(img, progressive=True)) == 1
    assert G.jpeg_orientation(jpeg_bytes(img, subsampling=0)) == 1
    rejected = {
        "cmyk": jpeg_bytes(img.convert("CMYK")),
        "truncated": plain[: len(plain) // 2],
        "trailing bytes": plain + b"\x00" * 8,
        "png": (lambda b: (img.save(b, "PNG"), b.getvalue())[1])(io.BytesIO()),
        "empty": b"",
        "xmp orientation": jpeg_bytes(img, xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'),
        "broken exif": plain[:2] + b"\xff\xe1\x00\x0cExif\x00\x00MM\x00\x2a" + plain[2:],
        "two exif blocks": _twice_exif(jpeg_bytes(img, orientation=6)),
    }
    for name, path in write_bad_images(tmp_path).items():
        if name in ("corrupt", "truncated", "empty", "cmyk", "gray", "i16"):
            rejected[f"fixture {name}"] = path.read_bytes()
    for name, data in rejected.items():
        assert G.jpeg_orientation(data) is None, name


def test_split_image_bytes_are_the_stored_bytes(tmp_path):
    data = make_photo_folder(tmp_path / "folder", n=2)
    split = D.load_split("imagefolder", data, "test")
    assert split.image_bytes(0) == Path(split.items[0].image).read_bytes()
    Path(split.items[1].image).unlink()
    assert split.image_bytes(1) is None  # load_image names the problem (file not found)
    hf = D.load_split(f"hf:{make_hf_dataset(tmp_path / 'hf', n_per_split=(1, 1, 2))}", tmp_path, "test")
    for i in range(len(hf)):
        assert np.array_equal(np.asarray(D.to_rgb(Image.open(io.BytesIO(hf.image_bytes(i))))),
                              np.asarray(hf.load_image(i)))


# ----------------------------------------------------------------------------- the GPU recipe on CPU tensors

@pytest.mark.parametrize("interpolation, resize, crop", [("bilinear", 256, 224), ("bicubic", 256, 224),
                                                          ("bicubic", 40, 32)])
def test_decode_orient_resize_matches_pil(interpolation, resize, crop):
    """Every EXIF orientation, gray and colour: the GPU path's steps (decode_jpeg, orient,
    resize_crop) on CPU tensors give PIL's pixels up to resampling rounding."""
    rng = np.random.default_rng(2)
    prep = ImagePrep(resize, crop, interpolation, IMAGENET_MEAN, IMAGENET_STD)
    for o in range(1, 9):
        data = jpeg_bytes(photo_like(rng, 120, 90, gray=o == 4), orientation=o)
        rgb = D.to_rgb(Image.open(io.BytesIO(data)))
        pil = image_pixels(prep)(rgb)
        (decoded,) = G.decode_jpegs([torch.frombuffer(bytearray(data), dtype=torch.uint8)], torch.device("cpu"))
        oriented = G.orient(decoded, G.jpeg_orientation(data))
        assert torch.equal(oriented.permute(1, 2, 0), torch.from_numpy(np.array(rgb)))  # same libjpeg, same pixels
        ours = resize_crop(oriented[None], prep)[0]
        assert ours.shape == pil.shape and ours.dtype == torch.uint8
        diff = (ours.int() - pil.int()).abs()
        assert diff.float().mean() < 0.1 and diff.max() <= 2, (o, diff.float().mean(), diff.max())


def test_decode_jpegs_marks_only_the_rejected_image():
    good = jpeg_bytes(photo_like(np.random.default_rng(3), 40, 30))
    bad = good[:200] + bytes(300) + b"\xff\xd9"  # valid headers, destroyed scan
    out = G.decode_jpegs([torch.frombuffer(bytearray(x), dtype=torch.uint8) for x in (good, bad, good)],
                         torch.device("cpu"))
    assert out[1] is None and out[0].shape == (3, 30, 40) and torch.equal(out[0], out[2])


def test_gpu_decoder_merges_rows_in_order_and_falls_back_to_pil(tmp_path, monkeypatch):
    """A batch mixing worker-decoded rows, encoded JPEGs and a JPEG the decoder rejects: inputs in
    row order, equal to the CPU path's pixels up to rounding; the rejected one decoded by PIL."""
    data = make_photo_folder(tmp_path / "data", n=6)
    split = D.load_split("imagefolder", data, "test")
    prep = ImagePrep(40, 32, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
    cpu = image_pixels(prep)
    expected = torch.stack([cpu(split.load_image(i)) for i in range(6)])
    encoded = [(i, G.read_jpeg(split, i)) for i in (0, 2, 3, 5)]
    assert all(isinstance(e, EncodedImage) for _, e in encoded)
    batch = Batch([1, 4], {"k": expected[[1, 4]]}, {}, Encoded.pack(encoded))
    real = G.decode_jpegs
    monkeypatch.setattr(G, "decode_jpegs", lambda data, device: [None if k == 2 else x
                                                                 for k, x in enumerate(real(data, device))])
    decoder = G.GpuDecoder(split, {"k": prep}, "cpu")
    out = decoder(batch)
    assert out.rows == list(range(6)) and out.unreadable == {} and out.encoded is None
    assert torch.equal(out.inputs["k"][[1, 3, 4]], expected[[1, 3, 4]])  # worker rows and the PIL fallback (row 3)
    assert (out.inputs["k"].int() - expected.int()).abs().float().mean() < 0.1
    assert decoder.stats() == {"decoded_on_device": 3, "decoder_fallbacks": 1}


def test_gpu_decoder_reports_unreadable_fallbacks_like_the_cpu_path(tmp_path, monkeypatch):
    data = make_photo_folder(tmp_path / "data", n=2)
    split = D.load_split("imagefolder", data, "test")
    encoded = G.read_jpeg(split, 1)
    Path(split.items[1].image).write_bytes(b"gone bad")  # the fallback re-reads the file: PIL fails
    monkeypatch.setattr(G, "decode_jpegs", lambda data, device: [None] * len(data))
    out = G.GpuDecoder(split, {"k": ImagePrep(40, 32, "bilinear", IMAGENET_MEAN, IMAGENET_STD)}, "cpu")(
        Batch([], {}, {}, Encoded.pack([(1, encoded)])))
    assert out.rows == [] and out.inputs == {} and isinstance(out.unreadable[1], Unreadable)
    with pytest.raises(D.ImageError) as err:
        split.load_image(1)
    assert out.unreadable[1].error().args == err.value.args


# ----------------------------------------------------------------------------- end to end (GPU path on CPU)

@pytest.mark.parametrize("workers", [0, 1])
def test_gpu_path_end_to_end_matches_cpu_path(tmp_path, gpu_path_on_cpu, workers):
    """Photo-like JPEGs (every orientation, gray, progressive) plus a PNG and a CMYK JPEG: the GPU
    path's features agree with the CPU path's, by id, for a bilinear and a bicubic encoder."""
    rng = np.random.default_rng(4)
    png = io.BytesIO()
    photo_like(rng, 90, 70).save(png, "PNG")
    extra = {"x_png.png": png.getvalue(), "x_cmyk.jpg": jpeg_bytes(photo_like(rng, 80, 60).convert("CMYK"))}
    data = make_photo_folder(tmp_path / "data", n=13, extra=extra)
    encoders = ("tiny-resnet", "tiny-dinov2")
    cpu = {e.name: e for e in run.extract(_cfg(data, tmp_path / "cpu", encoders, decode="cpu", workers=workers))}
    gpu = {e.name: e for e in run.extract(_cfg(data, tmp_path / "gpu", encoders, decode="auto", workers=workers))}
    for name in encoders:
        assert gpu[name].key == {**cpu[name].key, "decode": "gpu-nvjpeg"}
        assert list(gpu[name].ids) == list(cpu[name].ids) and len(gpu[name].ids) == 15
        a, b = _rows(cpu[name]), _rows(gpu[name])
        ids = sorted(a)
        x, y = np.stack([a[i] for i in ids]), np.stack([b[i] for i in ids])
        assert _row_cosines(x, y).min() >= 0.99 and cka(x, y) >= 0.999
        assert np.allclose(a["x_png"], b["x_png"]) and np.allclose(a["x_cmyk"], b["x_cmyk"])  # CPU-decoded both ways
        assert gpu[name].provenance["decoded_on_device"] == 13 and gpu[name].provenance["decoder_fallbacks"] == 0


@pytest.mark.parametrize("workers", [0, 1])
def test_gpu_path_errors_and_skips_like_the_cpu_path(tmp_path, gpu_path_on_cpu, workers):
    """Corrupt, truncated and empty files: the same ImageError (id, path) and the same skip records."""
    bad = write_bad_images(tmp_path / "bad")
    extra = {f"z_{k}{bad[k].suffix}": bad[k].read_bytes() for k in ("corrupt", "truncated", "empty", "exif_rotated")}
    data = make_photo_folder(tmp_path / "data", n=5, extra=extra)
    with pytest.raises(D.ImageError) as cpu_err:
        run.extract(_cfg(data, tmp_path / "c1", decode="cpu", workers=workers))
    with pytest.raises(D.ImageError) as gpu_err:
        run.extract(_cfg(data, tmp_path / "c2", decode="gpu", workers=workers))
    assert str(gpu_err.value) == str(cpu_err.value) and "--on-error skip" in str(gpu_err.value)
    (cpu,) = run.extract(_cfg(data, tmp_path / "c3", decode="cpu", workers=workers, on_error="skip"))
    (gpu,) = run.extract(_cfg(data, tmp_path / "c4", decode="gpu", workers=workers, on_error="skip"))
    assert gpu.skipped == cpu.skipped and len(cpu.skipped) == 3
    assert list(gpu.ids) == list(cpu.ids) and len(gpu.ids) == 6
    assert _row_cosines(cpu.features(), gpu.features()).min() >= 0.99


# ----------------------------------------------------------------------------- CUDA only

@CUDA
def test_nvjpeg_features_agree_with_cpu_decoded_features(tmp_path):
    """Real nvJPEG on photo-like JPEGs (every orientation, gray, progressive, 4:4:4): features of
    ResNet-18-sized and DINOv2-sized random encoders agree with the CPU path's (linear CKA >= 0.999,
    per-row cosine >= 0.99), pixels within a few grey levels."""
    data = make_photo_folder(tmp_path / "data", n=64, seed=7)
    options = {"resnet18": {"weights": "random"}}
    encoders = ("resnet18", "tiny-dinov2", "tiny-resnet")
    base = dict(device="cuda", batch_size=16, chunk_rows=32, workers=2, encoder_options=options)
    cpu = {e.name: e for e in run.extract(_cfg(data, tmp_path / "cpu", encoders, decode="cpu", **base))}
    gpu = {e.name: e for e in run.extract(_cfg(data, tmp_path / "gpu", encoders, decode="gpu", **base))}
    for name in encoders:
        assert gpu[name].key["decode"] == "gpu-nvjpeg" and "decode" not in cpu[name].key
        assert list(gpu[name].ids) == list(cpu[name].ids)
        assert gpu[name].provenance["decoded_on_device"] == 64
        x, y = cpu[name].features(), gpu[name].features()
        cos = _row_cosines(x, y)
        print(f"{name}: CKA {cka(x, y):.5f}, row cosine min {cos.min():.5f} mean {cos.mean():.5f}")
        assert cka(x, y) >= 0.999 and cos.min() >= 0.99
    split = D.load_split("imagefolder", data, "test")
    prep = get_spec("resnet18").prep
    batch = Batch([], {}, {}, Encoded.pack([(i, G.read_jpeg(split, i)) for i in range(len(split))]))
    out = G.GpuDecoder(split, {"k": prep}, "cuda")(batch)
    expected = torch.stack([image_pixels(prep)(split.load_image(i)) for i in range(len(split))])
    diff = (out.inputs["k"].cpu().int() - expected.int()).abs().float()
    print(f"pixels: mean |diff| {diff.mean():.3f} grey levels, per-image max of means {diff.mean((1, 2, 3)).max():.3f}")
    assert diff.mean() < 2.0 and diff.mean((1, 2, 3)).max() < 4.0
