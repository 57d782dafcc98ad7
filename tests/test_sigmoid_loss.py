"""The sigmoid (SigLIP) loss: against a loop over every (image, caption) pair, its symmetry and
sanity values, the config's combinations, and a tiny run that learns and saves the bias, which
``AlignedModel`` exposes as ``logit_bias`` (open_clip's SigLIP surface)."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from aligned import AlignedModel
from aligned.export import export
from extract.run import extract
from pipeline.config import ConfigError, TrainConfig, load_config
from tests.fixtures import make_imagefolder
from train.adapters import AlignModel
from train.errors import ConfigValueError
from train.fit import check_config, fit_adapters
from train.losses import info_nce, loss_label, multi_info_nce, pair_loss, sigmoid_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
SIGMOID = dataclasses.replace(TrainConfig(), loss="sigmoid")


def dense_sigmoid(a, b, t, bias, normalize):
    """-1/n sum_i sum_j log sigmoid(z_ij (t <a_i, b_j> + bias)), one pair at a time, in float64."""
    if normalize:
        a = [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in a]
        b = [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in b]
    total = 0.0
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            z = 1.0 if i == j else -1.0
            logit = t * sum(x * y for x, y in zip(ai, bj)) + bias
            total += math.log1p(math.exp(-z * logit))  # -log sigmoid(z * logit)
    return total / len(a)


@pytest.mark.parametrize("normalize", [True, False])
def test_sigmoid_against_a_loop_over_pairs(normalize):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    got = float(sigmoid_loss(a, b, 3.0, -2.0, normalize=normalize))
    assert got == pytest.approx(dense_sigmoid(a.tolist(), b.tolist(), 3.0, -2.0, normalize), rel=1e-12)
    assert float(sigmoid_loss(b, a, 3.0, -2.0, normalize=normalize)) == pytest.approx(got, rel=1e-12)  # no direction


def test_sigmoid_sanity_values_and_gradients():
    a = torch.eye(4)
    # SigLIP's start (t = 10, b = -10) on perfect pairs: positives sit at logit 0 -> log 2 each, negatives at -10
    assert float(sigmoid_loss(a, a, 10.0, -10.0)) == pytest.approx(math.log(2) + 3 * math.log1p(math.exp(-10)))
    assert float(sigmoid_loss(a, a, 100.0, -50.0)) < 1e-6  # confident and right
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    sigmoid_loss(torch.randn(6, 3), torch.randn(6, 3), scale, bias).backward()
    assert scale.grad is not None and bias.grad is not None and torch.isfinite(bias.grad)


def test_pair_loss_builds_the_sigmoid_loss_and_refuses_a_direction():
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    loss = pair_loss(SIGMOID)
    assert torch.allclose(loss(a, b, 10.0), sigmoid_loss(a, b, 10.0, -10.0))
    assert torch.allclose(pair_loss(SIGMOID, torch.tensor(-3.0))(a, b, 2.0), sigmoid_loss(a, b, 2.0, -3.0))
    assert torch.allclose(multi_info_nce([a, b], 10.0, loss), sigmoid_loss(a, b, 10.0, -10.0))
    assert torch.allclose(pair_loss(TrainConfig())(a, b, 3.0), info_nce(a, b, 3.0))  # the default is unchanged
    assert loss_label("sigmoid") == "symmetric sigmoid (SigLIP)"
    one_way = dataclasses.replace(SIGMOID, loss_direction="image_to_text")
    with pytest.raises(ValueError, match="no query direction"):
        pair_loss(one_way)
    with pytest.raises(ConfigValueError, match="no query direction.*train.loss_direction"):
        check_config(dataclasses.replace(one_way, device="cpu"))
    with pytest.raises(ConfigValueError, match="sigmoid_scale"):
        check_config(dataclasses.replace(SIGMOID, sigmoid_scale=0.5, device="cpu"))
    with pytest.raises(ConfigError, match="Did you mean: sigmoid"):
        load_config(None, options={"train.loss": "sigmod"})


def test_align_model_learns_scale_and_bias_only_for_the_sigmoid_loss():
    m = AlignModel({"image": 3, "text": 4}, dataclasses.replace(SIGMOID, dim=2, sigmoid_scale=10.0, sigmoid_bias=-10.0))
    assert isinstance(m.logit_bias, torch.nn.Parameter) and float(m.logit_bias.detach()) == -10.0
    assert m.learnable_scale and float(m.logit_scale().detach()) == pytest.approx(10.0)
    assert {"log_scale", "logit_bias"} <= set(m.state_dict())
    plain = AlignModel({"image": 3, "text": 4}, dataclasses.replace(TrainConfig(), dim=2))
    assert plain.logit_bias is None and not plain.learnable_scale and "logit_bias" not in plain.state_dict()


def test_a_sigmoid_run_saves_its_bias_and_the_aligned_model_exposes_it(tmp_path):
    data = make_imagefolder(tmp_path / "data", n=6)
    opts = {"data.dataset": "imagefolder", "data.data_dir": str(data), "data.cache": str(tmp_path / "cache"),
            "extract.encoders": ("tiny-resnet", "tiny-gpt2"), "extract.workers": 0, "train.image": "tiny-resnet",
            "train.text": "tiny-gpt2", "train.reference": "", "train.dim": 8, "train.epochs": 3,
            "train.batch_size": 6, "train.lr": 1e-2, "train.device": "cpu", "train.loss": "sigmoid", "train.name": "sig"}
    cfg = load_config(None, options=opts)
    extract(cfg)
    result = fit_adapters(cfg, progress=False)
    saved = load_file(str(result.run_dir / "adapters.safetensors"))
    bias = float(saved["logit_bias"])
    assert bias != -10.0 and math.isfinite(bias)  # learnt (lr 1e-2 moves it)
    assert "logit_bias" in result.history[-1]  # history.csv follows the learnt bias
    assert json.loads((result.run_dir / "adapters.json").read_text())["train"]["loss"] == "sigmoid"
    model = AlignedModel.from_run("sig", cache=tmp_path / "cache", device="cpu")
    assert float(model.logit_bias) == pytest.approx(bias)
    img, txt, scale, b = model(torch.zeros(1, 3, 32, 32), model.tokenizer(["a cat"]))
    assert float(b) == pytest.approx(bias) and img.shape == txt.shape == (1, 8)
    out = export("sig", tmp_path / "model", cache=tmp_path / "cache")
    assert json.loads((out / "config.json").read_text())["logit_bias"] == pytest.approx(bias)
    assert float(AlignedModel.from_pretrained(out, device="cpu").logit_bias) == pytest.approx(bias)
    assert "sigmoid (SigLIP) loss, learnt temperature" in (out / "README.md").read_text()
