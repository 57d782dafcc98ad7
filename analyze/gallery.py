"""The report's retrieval gallery: what the shared space retrieves, shown with the data.

A few test images, each with its top-5 retrieved captions (the true caption marked, and its
rank when it is not among them), and a few captions, each with its top-5 retrieved images as
thumbnails. The examples are drawn reproducibly (``analyze.seed``) and half of them, where
possible, are failures (the true item not ranked first), so the gallery shows what goes wrong
as well as what works. Thumbnails are JPEGs embedded as base64 data URIs in both the Markdown
and the HTML, so the report stays one self-contained file.

Scores are cosine similarities of the run's adapter outputs, over every image and caption of
the split (the retrieval protocol of ``train.retrieval``, with its tie rule: a wrong item tied
with the true one ranks above it, in the ranks and in the order shown).
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image

from analyze.evalrun import RunView, open_run
from analyze.markdown import md_text
from extract.datasets import SIDE_FILE, Split, config_options, content_digest, content_hashes, load_split
from pipeline.cache import StaleCacheError
from pipeline.config import PipelineConfig
from train.retrieval import cosine_scores, ranks_from_scores

N_EXAMPLES = 4  # images and captions shown, each
TOP = 5  # retrieved items per example
THUMB_PX = 96  # thumbnail side, pixels
THUMB_QUALITY = 80  # JPEG quality of thumbnails

HIT_STYLE = "border:3px solid #2a2;"  # frame of a correctly retrieved thumbnail
MISS_STYLE = "border:3px solid transparent;"


def choose(ranks: np.ndarray, k: int, seed: int) -> list[int]:
    """k row indices drawn with ``seed``: half with rank > 0 (failures) and half with rank 0
    (hits) where there are enough of each, the rest from the other group; sorted."""
    rng = np.random.default_rng(seed)
    fails, hits = np.flatnonzero(ranks > 0), np.flatnonzero(ranks == 0)
    n_fail = min(len(fails), max(k - len(hits), (k + 1) // 2))
    picked = list(rng.choice(fails, n_fail, replace=False)) + list(rng.choice(hits, min(len(hits), k - n_fail), replace=False))
    return sorted(int(i) for i in picked)


def _order(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Candidates by decreasing score; among equal scores the wrong ones first (the tie rule of
    ``train.retrieval``), then by index."""
    return np.lexsort((np.arange(len(scores)), correct, -scores))


def thumbnail_uri(image, px: int = THUMB_PX) -> str:
    """``data:image/jpeg;base64,...`` of a PIL image shrunk to fit px x px and centred on a white
    px x px square (so that it is shown at its natural size)."""
    img = image.convert("RGB")
    img.thumbnail((px, px))
    square = Image.new("RGB", (px, px), "white")
    square.paste(img, ((px - img.width) // 2, (px - img.height) // 2))
    buf = io.BytesIO()
    square.save(buf, format="JPEG", quality=THUMB_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, hit: bool, alt: str) -> str:
    return (f'<img src="{uri}" alt="{html.escape(alt)}" width="{THUMB_PX}" '
            f'style="{HIT_STYLE if hit else MISS_STYLE}vertical-align:top;margin:2px">')


def check_unchanged(rv: RunView, split: str, data: Split) -> None:
    """StaleCacheError when the data folder's split is not the one the run's entries were
    extracted from: ids, file names or captions (the entries' ``fingerprint``) or the images'
    bytes (``content``) changed since, so its captions and images would be shown beside scores
    of other data. The check ``extract`` makes before reusing an entry."""
    entries = {m: rv.entry(split, m) for m in ("image", "text")}
    fix = (f"Re-extract (extract --split {split} --force), retrain, and build the report again; or point "
           f"--set data.data_dir to the data the cache was made from.")
    for m, e in entries.items():
        if e.key.get("fingerprint") not in (None, data.fingerprint()):
            raise StaleCacheError(f"The {split} split in {data.source or rv.cfg.data.data_dir} changed since entry "
                                  f"{e.name!r} was extracted (ids, file names or captions: fingerprint "
                                  f"{str(e.key['fingerprint'])[:12]} then, {data.fingerprint()[:12]} now), so the "
                                  f"gallery would show data beside scores of other data. {fix}")
    recorded = entries["image"].key.get("content")
    if recorded:
        digests = content_hashes(data, entries["image"].path.parent.parent / SIDE_FILE)
        if content_digest(data.ids, digests) != recorded:
            before = dict(zip(*((entries["image"].content() or {}).get(k, []) for k in ("ids", "digests"))))
            changed = [i for i, d in zip(data.ids, digests) if before.get(i) != d]
            raise StaleCacheError(f"Image files of the {split} split changed since entry {entries['image'].name!r} "
                                  f"was extracted ({len(changed)} of {len(data.ids)}"
                                  f"{f', first: {changed[0]!r}' if changed else ''}), so the gallery would show "
                                  f"other images beside their scores. {fix}")


def build_gallery(cfg: PipelineConfig, run: str | None = None) -> tuple[str, str]:
    """(markdown, html) of the gallery for ``run`` on ``analyze.split``. Needs the dataset's
    files (images and captions) under ``data.data_dir``; raises PipelineError otherwise."""
    rv = open_run(cfg, run)
    split = cfg.analyze.split
    test = rv.split(split)
    data = load_split(cfg.data.dataset, cfg.data.data_dir, split, **config_options(cfg.data))
    check_unchanged(rv, split, data)
    policy = str(rv.entry(split, "text").key.get("captions", cfg.data.captions))
    caption_of = {r.id: r.text for r in data.caption_rows(policy)}
    item_of = {it.id: i for i, it in enumerate(data.items)}
    missing = [i for i in test.image_ids if i not in item_of] + [t for t in test.text_ids if t not in caption_of]
    if missing:
        raise FileNotFoundError(f"{len(missing)} cached {split} samples are not in {cfg.data.data_dir} "
                                f"(first: {missing[0]!r}); the gallery needs the dataset the cache was made from.")
    S = cosine_scores(rv.embed("image", test.image), rv.embed("text", test.text))  # (n_images, n_texts)
    ranks = {k: v.cpu().numpy() for k, v in ranks_from_scores(S, test.text_to_image).items()}
    thumbs: dict[int, str] = {}

    def thumb(i: int) -> str:
        if i not in thumbs:
            thumbs[i] = thumbnail_uri(data.load_image(item_of[test.image_ids[i]]))
        return thumbs[i]

    md, body = [], []
    md.append(f"Images and their top-{TOP} captions (✓ = a true caption):")
    body.append(f"<p>Images and their top-{TOP} captions (✓ = a true caption; score = cosine similarity).</p>"
                "<table><tbody>")
    for i in choose(ranks["i2t"], N_EXAMPLES, cfg.analyze.seed):
        top = _order(S[i], test.text_to_image == i)[:TOP]
        lines = [f"{'✓ ' if test.text_to_image[t] == i else ''}{caption_of[test.text_ids[t]]} ({S[i, t]:.2f})" for t in top]
        best_own = max(np.flatnonzero(test.text_to_image == i), key=lambda t: S[i, t])
        note = "" if ranks["i2t"][i] < TOP else (f"true caption, ranked {ranks['i2t'][i] + 1}: "
                                                  f"{caption_of[test.text_ids[best_own]]} ({S[i, best_own]:.2f})")
        md.append(f"\n![{md_text(test.image_ids[i])}]({thumb(i)}) {md_text(test.image_ids[i])}\n")
        md += [f"{r + 1}. {md_text(line)}" for r, line in enumerate(lines)] + ([f"\n*{md_text(note)}*"] if note else [])
        items = "".join(f"<li>{'<b>' if ln.startswith('✓') else ''}{html.escape(ln)}{'</b>' if ln.startswith('✓') else ''}</li>"
                        for ln in lines)
        body.append(f"<tr><td>{_img(thumb(i), False, test.image_ids[i])}<br><code>{html.escape(test.image_ids[i])}</code>"
                    f"</td><td style=\"text-align:left\"><ol>{items}</ol><small>{html.escape(note)}</small></td></tr>")
    body.append("</tbody></table>")
    md.append(f"\nCaptions and their top-{TOP} images (✓ = the caption's image, framed green in the HTML):")
    body.append(f"<p>Captions and their top-{TOP} images (green frame = the caption's image).</p><table><tbody>")
    for t in choose(ranks["t2i"], N_EXAMPLES, cfg.analyze.seed + 1):
        true = int(test.text_to_image[t])
        top = _order(S[:, t], np.arange(S.shape[0]) == true)[:TOP]
        caption = caption_of[test.text_ids[t]]
        note = "" if ranks["t2i"][t] < TOP else f"its image, ranked {ranks['t2i'][t] + 1} ({S[true, t]:.2f}):"
        md.append(f"\n> {md_text(caption)}\n\n"
                  + " ".join(f"{'✓' if i == true else ''}![{md_text(test.image_ids[i])}]({thumb(i)})" for i in top)
                  + (f"\n\n*{md_text(note)}* ![{md_text(test.image_ids[true])}]({thumb(true)})" if note else ""))
        cells = "".join(_img(thumb(int(i)), i == true, test.image_ids[i]) for i in top)
        if note:
            cells += f"<br><small>{html.escape(note)}</small><br>{_img(thumb(true), True, test.image_ids[true])}"
        body.append(f"<tr><td style=\"text-align:left;max-width:260px\">{html.escape(caption)}</td>"
                    f"<td style=\"text-align:left\">{cells}</td></tr>")
    body.append("</tbody></table>")
    return "\n".join(md), "\n".join(body)
