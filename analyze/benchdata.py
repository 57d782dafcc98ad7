"""The datasets ``analyze benchmark`` hands to CLIP_benchmark: the project's own split, and any
dataset CLIP_benchmark's ``build_dataset`` knows, read from files already on disk.

Own split (``split_dataset``): the images and caption rows of a run's cached ``analyze.split``,
joined by sample id exactly as ``metrics.json``'s test recall joins them, decoded from the dataset
files by the same loader ``extract`` uses (``extract.datasets``). As CLIP_benchmark's retrieval
datasets (COCO, Flickr30k) do, one item is one image with the list of its captions (five per image
on Flickr30k / COCO with ``data.captions = "all"``, one with ``"first"`` / ``"longest"``); with
labels it is one image with its class index, ``classes`` the readable class names and
``templates`` the prompt templates in CLIP_benchmark's ``{c}`` form.

CLIP_benchmark datasets (``clip_benchmark_dataset``): ``build_dataset(name, root, transform,
split, download=False)``. CLIP_benchmark fetches missing files itself for many datasets even with
``download=False`` (wget / kaggle / gdown through ``subprocess``, or ``requests``), so the build
runs with new processes and network connections refused (``offline``): whatever it tried
becomes a ``BenchmarkError`` that names it (the URL is in the command), and the fix is to fetch
the files on a machine with network, e.g. ``python -c "from clip_benchmark.datasets.builder
import build_dataset; build_dataset('cifar10', root='ROOT', split='test', download=True)"``, and
copy ROOT to ``--dataset-root``. Files each dataset needs there (CLIP_benchmark's layout):

  cifar10, cifar100, mnist, stl10, food101, dtd, pets, cars, flowers, gtsrb, eurosat, sun397,
  country211, pcam, renderedsst2, fgvc_aircraft, voc2007
                    torchvision's layout (e.g. ROOT/cifar-10-batches-py/), as download=True writes it
  imagenet1k        ROOT/ILSVRC2012_devkit_t12.tar.gz and ROOT/ILSVRC2012_img_val.tar (torchvision ImageNet)
  flickr30k/8k      ROOT/<images>.jpg and ROOT/flickr30k_test_karpathy.txt (flickr8k_...), from
                    github.com/mehdidc/retrieval_annotations/releases/download/1.0.0/
  mscoco_captions   ROOT/val2014/ and ROOT/coco_test_karpathy.json (same release)
  wds/<name>        a WebDataset folder (ROOT/test/*.tar, classnames.txt, zeroshot_classification_templates.txt)
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import subprocess
import socket
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Sequence
from unittest import mock

import numpy as np
import torch

from analyze.evalrun import RunView
from extract.datasets import config_options, load_split
from extract.labels import class_name
from pipeline.errors import PipelineError, did_you_mean

log = logging.getLogger(__name__)

TASKS = ("zeroshot_retrieval", "zeroshot_classification")  # CLIP_benchmark's task names that are supported
OWN = "own"  # the dataset name of the project's own split
INSTALL = "pip install 'platonic-align[benchmark]' (or: pip install clip-benchmark requests)"


class BenchmarkError(PipelineError, ValueError):
    """A benchmark that cannot run as asked (missing package, dataset files or labels)."""


def clip_benchmark() -> dict[str, ModuleType]:
    """CLIP_benchmark's modules {"retrieval", "classification", "builder"}, imported on first use:
    an optional extra (``[benchmark]``) that takes seconds to import (torchvision datasets, sklearn)."""
    try:
        return {"retrieval": importlib.import_module("clip_benchmark.metrics.zeroshot_retrieval"),
                "classification": importlib.import_module("clip_benchmark.metrics.zeroshot_classification"),
                "builder": importlib.import_module("clip_benchmark.datasets.builder")}
    except ImportError as exc:
        raise BenchmarkError(f"analyze benchmark needs LAION's CLIP_benchmark ({exc}); install it: {INSTALL}.") from None


def topk_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """Stand-in for CLIP_benchmark's ``zeroshot_classification.accuracy`` where that one fails:
    it turns a 1-element array into a float with ``float()``, an error since NumPy 2.4
    (LAION-AI/CLIP_benchmark#147, open). Same semantics: one ``topk`` of the largest k (so the
    same order among ties), the fraction of rows whose target is among the first k columns."""
    idx = output.topk(max(topk), dim=1).indices  # (n, max k), best first
    return [(idx[:, :k] == target[:, None]).any(1).double().sum().item() / len(target) for k in topk]


def _accuracy_works(classification: ModuleType) -> bool:
    try:
        classification.accuracy(torch.eye(2), torch.arange(2), topk=(1,))
        return True
    except TypeError:
        return False


@contextlib.contextmanager
def working_accuracy(classification: ModuleType):
    """CLIP_benchmark's classification module with ``accuracy`` replaced by ``topk_accuracy``
    inside the block when its own fails on this NumPy; left alone otherwise."""
    if _accuracy_works(classification):
        yield
    else:
        with mock.patch.object(classification, "accuracy", topk_accuracy):
            yield


def cb_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("clip-benchmark")
    except PackageNotFoundError:
        return "unknown"


def cb_templates(templates: Sequence[str]) -> list[str]:
    """Project templates (one ``{}`` for the class name) in CLIP_benchmark's form (``{c}``), other
    braces escaped, so ``t.format(c=name)`` gives what ``t.format(name)`` gives here."""
    return [t.replace("{", "{{").replace("}", "}}").replace("{{}}", "{c}") for t in templates]


# ----------------------------------------------------------------------------- the own split
class SplitImages(torch.utils.data.Dataset):
    """Images of an ``extract.datasets.Split`` with one target each: a list of captions
    (retrieval) or a class index (classification). ``transform``: the model's preprocess."""

    def __init__(self, split, rows: Sequence[int], targets: Sequence[Any], transform: Callable,
                 classes: Sequence[str] | None = None, templates: Sequence[str] | None = None):
        self.split, self.rows, self.targets, self.transform = split, list(rows), list(targets), transform
        if classes is not None:
            self.classes, self.templates = list(classes), list(templates or [])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.transform(self.split.load_image(self.rows[i])), self.targets[i]


@dataclass
class OwnSplit:
    """The own split as CLIP_benchmark datasets plus the cached rows they were made from."""

    retrieval: SplitImages  # one image with its captions per item, in the run's image-row order
    text_to_image: np.ndarray  # (n_texts,) image row of each caption of ``rv.split`` (the cached order)
    caption_order: np.ndarray  # (n_texts,) cached caption row of each caption as CLIP_benchmark sees them


def split_dataset(rv: RunView, split_name: str, transform: Callable) -> OwnSplit:
    """The run's cached split ``split_name`` as a retrieval dataset (see the module docstring)."""
    cfg = rv.cfg
    pairs = rv.split(split_name)
    policy = str(rv.entry(split_name, "text").key.get("captions", cfg.data.captions))
    split = load_split(cfg.data.dataset, cfg.data.data_dir, split_name, **config_options(cfg.data))
    where = {it.id: i for i, it in enumerate(split.items)}
    texts = {r.id: r.text for r in split.caption_rows(policy)}
    lost = [i for i in pairs.image_ids if i not in where] or [t for t in pairs.text_ids if t not in texts]
    if lost:
        raise BenchmarkError(f"{split_name} row {lost[0]!r} of the run's cache entries is not in {cfg.data.data_dir} "
                             f"(captions = {policy!r}); the cache and the dataset differ. Re-extract, or point "
                             f"--set data.data_dir to the data the cache was made from.")
    order = np.argsort(pairs.text_to_image, kind="stable")  # captions grouped by image, file order within
    captions: list[list[str]] = [[] for _ in pairs.image_ids]
    for t in order:
        captions[pairs.text_to_image[t]].append(texts[pairs.text_ids[t]])
    rows = [where[i] for i in pairs.image_ids]
    return OwnSplit(SplitImages(split, rows, captions, transform), np.asarray(pairs.text_to_image), order)


def labelled_dataset(own: OwnSplit, labels: np.ndarray, classes: Sequence[str],
                     templates: Sequence[str]) -> SplitImages:
    """The same images with class indices ``labels`` (n_images,), class names shown as
    ``analyze zeroshot`` shows them and its templates in CLIP_benchmark's form."""
    r = own.retrieval
    return SplitImages(r.split, r.rows, [int(y) for y in labels], r.transform,
                       [class_name(c) for c in classes], cb_templates(templates))


# ----------------------------------------------------------------------------- CLIP_benchmark's datasets
def _refused(name: str, root: str, split: str, what: str) -> BenchmarkError:
    fetch = (f"python -c \"from clip_benchmark.datasets.builder import build_dataset; "
             f"build_dataset('{name}', root='{root}', split='{split}', download=True)\"")
    return BenchmarkError(f"Dataset {name!r} is not complete under --dataset-root {root} ({what}); analyze "
                          f"benchmark never downloads. Fetch it on a machine with network ({fetch}) and copy "
                          f"the folder to {root} (the files each dataset needs: docs/aligned-model.md).")


@contextlib.contextmanager
def offline(name: str, root: str, split: str = "test"):
    """No new processes and no network connections inside the block: CLIP_benchmark's download
    attempts (``subprocess`` wget / kaggle / unzip, ``requests``) raise ``BenchmarkError`` instead."""
    def no_process(args, *a, **kw):
        cmd = args if isinstance(args, str) else " ".join(map(str, args))
        tool = cmd.split()[1] if cmd.startswith("which ") and len(cmd.split()) > 1 else None
        raise _refused(name, root, split, f"CLIP_benchmark would download it with {tool}" if tool
                       else f"CLIP_benchmark would run `{cmd}`")

    def no_network(self, address, *a, **kw):
        raise _refused(name, root, split, f"CLIP_benchmark would connect to {address}")

    printed = io.StringIO()  # its "Downloading ..." prints would mislead: kept for the debug log
    try:
        with mock.patch.object(subprocess, "Popen", no_process), mock.patch.object(socket.socket, "connect", no_network), \
                contextlib.redirect_stdout(printed):
            yield
    finally:
        if printed.getvalue().strip():
            log.debug("CLIP_benchmark printed while building %s: %s", name, printed.getvalue().strip())


PLAIN_NAMES = ("cifar10", "cifar100", "food101", "dtd", "pets", "flowers", "eurosat", "caltech101", "pcam",
               "imagenet-o", "imagenet-w", "imagenet1k-unverified", "babel_imagenet", "winoground",
               "multilingual_mscoco_captions", "crossmodal3600", "xtd10", "xtd200", "flickr30k-200", "dummy")
#   names CLIP_benchmark's build_dataset takes that its collections do not list (for "did you mean")


def known_datasets(builder: ModuleType) -> list[str]:
    """Dataset names CLIP_benchmark's builder takes (its collections, ``PLAIN_NAMES``), for "did you mean"."""
    return sorted({n for names in builder.dataset_collection.values() for n in names} | set(PLAIN_NAMES))


def clip_benchmark_dataset(name: str, root: str, split: str, transform: Callable, task: str,
                           templates: Sequence[str] | None = None):
    """CLIP_benchmark's dataset ``name`` from ``root`` (``{dataset}`` in it is replaced by the name,
    as CLIP_benchmark's ``--dataset_root`` allows), never downloading. templates: project templates
    replacing CLIP_benchmark's own for classification (None = its own)."""
    builder = clip_benchmark()["builder"]
    root = str(root).format(dataset=name, dataset_cleaned=name.replace("/", "-"))
    try:
        with offline(name, root, split):
            ds = builder.build_dataset(name, root=root, transform=transform, split=split, download=False, task=task)
    except BenchmarkError:
        raise
    except ValueError as exc:
        if "Unsupported dataset" in str(exc):
            raise BenchmarkError(f"CLIP_benchmark has no dataset {name!r}." + did_you_mean(name, known_datasets(builder))
                                 + f" Use {OWN!r} for the project's own split.") from None
        raise BenchmarkError(f"CLIP_benchmark cannot build {name!r} from {root}: {exc}") from None
    except AssertionError as exc:  # CLIP_benchmark asserts the split names each dataset has
        raise BenchmarkError(f"CLIP_benchmark refuses {name!r} split {split!r}: {exc} (pass --split).") from None
    except ImportError as exc:
        raise BenchmarkError(f"CLIP_benchmark's {name!r} needs another package: {exc}.") from None
    except (RuntimeError, OSError) as exc:  # torchvision: "Dataset not found or corrupted"
        raise _refused(name, root, split, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if task == "zeroshot_classification" and templates is not None:
        ds.templates = cb_templates(templates)
    return ds


def collate_for(name: str, task: str) -> Callable:
    """CLIP_benchmark's collate function for dataset ``name`` (caption lists stay lists); the own
    split collates as its retrieval datasets do, or as its classification datasets do."""
    builder = clip_benchmark()["builder"]
    if name == OWN:
        return builder.image_captions_collate_fn if task == "zeroshot_retrieval" else torch.utils.data.default_collate
    return builder.get_dataset_collate_fn(name)


def default_task(name: str) -> str:
    """CLIP_benchmark's task for a dataset name, refused when it is not one of ``TASKS``."""
    task = clip_benchmark()["builder"].get_dataset_default_task(name)
    if task not in TASKS:
        raise BenchmarkError(f"CLIP_benchmark evaluates {name!r} by {task}; analyze benchmark runs "
                             f"{' and '.join(TASKS)} only.")
    return task
