"""Zero-shot prompts: class names filled into templates, embedded by a run's frozen text
encoder and cached like any feature entry.

Templates: ``DEFAULT_TEMPLATES`` (a short CLIP-style set), or a file with one template per line
holding ``{}`` where the class name goes (blank lines and lines starting with ``#`` ignored).
Other languages: a TOML prompts file with templates and class names per language
(:func:`language_prompts`, docs/languages.md).

Cache: ``<cache>/prompts/<dataset>/<text entry>.h5``, written by ``pipeline.cache.EntryWriter``
(atomic, locked). Row ``<label>#<t>`` holds class ``label`` in template ``t``; the entry's
``key`` records the encoder (exactly as in the text entry the run was trained on), the classes,
the templates and the precision. An entry made for another request is stale: it is refused
with the differing fields named (``StaleCacheError``), and ``force`` recomputes it.

The encoder is rebuilt from the text entry itself: its name and the encoder options recorded
in its provenance, and the result must describe the same encoder as the entry's key (else
``PromptError``), so prompts and captions go through the same weights, pooling and
tokenisation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import string
import time
import tomllib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from extract.encoders import forward_batch, forward_tokens, get_spec, load_encoder
from extract.labels import class_name
from pipeline.cache import Entry, EntryWriter, entry_filename, entry_path
from pipeline.errors import PipelineError
from pipeline.languages import normalize
from pipeline.runtime import resolve_device, utc_now, versions
from train.tokens import pad_tokens

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a picture of a {}.", "a cartoon of a {}.",
                     "an illustration of a {}.", "a {}.")  # CLIP-style; the demo's stamps are clip art
PROMPTS_FOLDER = "prompts"  # <cache>/prompts/<dataset>/<text entry>.h5
BATCH = 64  # prompts per forward pass


class PromptError(PipelineError, ValueError):
    """Templates or a text encoder that cannot produce the prompts asked for."""


def read_templates(path: str | Path | None) -> tuple[str, ...]:
    """Templates from a file (see the module docstring), or ``DEFAULT_TEMPLATES`` for None."""
    if path is None:
        return DEFAULT_TEMPLATES
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    templates = tuple(ln for ln in lines if ln and not ln.startswith("#"))
    return check_templates(templates, str(path))


def check_templates(templates: Sequence[str], where: str = "templates") -> tuple[str, ...]:
    if not templates:
        raise PromptError(f"{where}: no templates; give at least one line such as 'a photo of a {{}}.'")
    for t in templates:
        try:
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(t) if name is not None]
        except ValueError as exc:  # a lone '{' or '}'
            raise PromptError(f"{where}: template {t!r} is not a valid template ({exc}); write a literal brace as "
                              f"'{{{{' or '}}}}'.") from None
        if fields != [("", "", None)]:
            raise PromptError(f"{where}: every template needs exactly one '{{}}' for the class name (and no other "
                              f"'{{...}}'); got {t!r}.")
    return tuple(templates)


def prompt_texts(classes: Sequence[str], templates: Sequence[str],
                 names: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(ids, texts): C * T prompts, class-major (row c * T + t = class c in template t); ``names``:
    the classes' names in the prompts' language (default: ``class_name`` of each class)."""
    ids = [f"{c}#{t}" for c in classes for t in range(len(templates))]
    shown = list(names) if names is not None else [class_name(c) for c in classes]
    return ids, [tpl.format(n) for n in shown for tpl in templates]


def read_prompts_file(path: str | Path) -> dict[str, dict]:
    """{language: {"templates": (...), "classes": {class: name}}} of a prompts file (codes normalised)."""
    path = Path(path)
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PromptError(f"prompts file {str(path)!r} is not readable TOML ({exc}); see docs/languages.md.") from None
    out = {}
    for lang, table in tree.items():
        code = normalize(lang, f"prompts file {path}")
        if not isinstance(table, dict) or not isinstance(table.get("templates", []), list):
            raise PromptError(f"{path} [{lang}]: expected templates = [\"...{{}}...\"] and classes = {{ name = \"...\" }}.")
        out[code] = {"templates": check_templates(tuple(table.get("templates", ())), f"{path} [{lang}]"),
                     "classes": {str(k): str(v) for k, v in dict(table.get("classes", {})).items()}}
    return out


def language_prompts(path: str | Path | None, language: str, default: str, classes: Sequence[str]
                     ) -> tuple[tuple[str, ...], list[str] | None]:
    """(templates, class names or None = the classes' own names) for zero-shot in ``language``."""
    language = normalize(language, "--language")
    if path is None:
        if language == normalize(default):
            return DEFAULT_TEMPLATES, None
        raise PromptError(f"zero-shot in {language!r} needs templates and class names in {language}: pass "
                          f"--prompts FILE (a TOML table [{language}], see docs/languages.md); English templates are "
                          f"never used for another language.")
    tables = read_prompts_file(path)
    if language not in tables:
        raise PromptError(f"prompts file {path} has no templates for {language!r} (it has: "
                          f"{', '.join(sorted(tables)) or 'none'}); add a table [{language}].")
    names = tables[language]["classes"]
    if not names and language == normalize(default):
        return tables[language]["templates"], None
    missing = [c for c in classes if c not in names]
    if missing:
        raise PromptError(f"prompts file {path} [{language}] has no name for {len(missing)} of {len(classes)} classes "
                          f"(first: {', '.join(missing[:5])}); add them under classes.")
    return tables[language]["templates"], [names[c] for c in classes]



def prompt_entry_path(cache: str | Path, dataset: str, text_entry: str) -> Path:
    return entry_path(cache, PROMPTS_FOLDER, entry_filename(dataset), text_entry)


def encoder_for(text: Entry):
    """The EncoderSpec that made the text entry ``text`` (checked against its key)."""
    options = ((text.provenance.get("config") or {}).get("extract") or {}).get("encoder_options") or {}
    name = str(text.key.get("entry", text.name))
    spec = get_spec(name, **options.get(name, {}))
    if spec.name != name:
        spec = dataclasses.replace(spec, name=name)
    want = text.key.get("encoder")
    have = json.loads(json.dumps(spec.provenance(), sort_keys=True, default=str))
    if want is not None and have != want:
        diff = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
        raise PromptError(f"Cannot rebuild the text encoder of entry {text.name!r} ({text.path}): it was made with "
                          f"other settings ({', '.join(diff[:4])}). Re-extract it with the current code.")
    return spec


@torch.no_grad()
def embed_texts(spec, texts: Sequence[str], device: str = "auto", precision: str = "fp32",
                layer: int | None = None) -> np.ndarray:
    """(len(texts), d) float32 features of ``texts`` by the frozen encoder ``spec``: its pooled
    features, or hidden layer ``layer`` (an index of the list ``extract --layers all`` stores)."""
    encoder = load_encoder(spec, resolve_device(device))
    out = []
    for s in range(0, len(texts), BATCH):  # the forward pass extraction runs on captions (forward_batch)
        feats, layers = forward_batch(encoder, encoder.tokenize(list(texts[s:s + BATCH])), precision, layer is not None)
        out.append((feats if layer is None else layers[layer]).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.dim), np.float32)


@torch.no_grad()
def prompt_tokens(text: Entry, classes: Sequence[str], templates: Sequence[str], length: int,
                  device: str = "auto", names: Sequence[str] | None = None) -> np.ndarray:
    """(C * T, length * (w + 1)) padded token rows of every prompt (``train.tokens.pad_tokens``) by
    the text entry's encoder, rounded to the entry's token dtype as extraction stores them;
    ``names``: class names in the prompts' language (None = the classes' own names)."""
    _, texts = prompt_texts(classes, check_templates(templates), names)
    encoder = load_encoder(encoder_for(text), resolve_device(device))
    precision, dtype = str(text.key.get("precision", "fp32")), str(text.key.get("token_dtype", "float16"))
    rows = []
    for s in range(0, len(texts), BATCH):
        _, tokens, mask = forward_tokens(encoder, encoder.tokenize(list(texts[s:s + BATCH])), precision)
        flat = tokens[mask].to(getattr(torch, dtype)).float().cpu().numpy()
        rows.append(pad_tokens(flat, mask.sum(1).cpu().numpy(), length))
    return np.concatenate(rows)


def prompt_features(cache: str | Path, dataset: str, text: Entry, classes: Sequence[str],
                    templates: Sequence[str], device: str = "auto", force: bool = False,
                    layer: int | None = None, names: Sequence[str] | None = None,
                    language: str | None = None) -> np.ndarray:
    """(C * T, d_text) features of every class in every template (row order of ``prompt_texts``),
    from the cache, else computed by the text entry's encoder and cached; ``layer``: the stored
    hidden layer a run's text adapter reads (None = the pooled features), cached apart. A cached
    entry made for other classes, templates or another encoder is refused (StaleCacheError)
    unless ``force``. ``names`` / ``language``: class names and the language of prompts that are
    not the default language's (cached apart, as ``<entry>.lang-<code>``)."""
    templates = check_templates(templates)
    ids, texts = prompt_texts(classes, templates, names)
    precision = str(text.key.get("precision", "fp32"))
    key = {"entry": text.name, "kind": "zeroshot-prompts", "encoder": text.key.get("encoder"), "dataset": dataset,
           "classes": list(classes), "templates": list(templates), "precision": precision,
           **({} if layer is None else {"layer": int(layer)}),
           **({} if language is None else {"language": language, "names": list(names or classes)})}
    name = text.name if language is None else f"{text.name}.lang-{language}"
    name = name if layer is None else f"{name}.layer{int(layer)}"
    path = prompt_entry_path(cache, dataset, name)
    writer = EntryWriter(path, name, ids, key, chunk_rows=max(1, len(ids)), force=force)
    if writer.pending():
        t0 = time.perf_counter()
        feats = embed_texts(encoder_for(text), texts, device, precision, layer)
        writer.write_chunk(0, feats)
        log.info("embedded %d prompts with %s in %.1f s -> %s", len(texts), text.name, time.perf_counter() - t0, path)
        prov = {"versions": versions(), "source_entry": str(text.path), "texts": texts,
                "extract_seconds": time.perf_counter() - t0, "created": utc_now()}
        entry = writer.finalize(prov)
    else:
        entry = writer.finalize({})
    return entry.features()
