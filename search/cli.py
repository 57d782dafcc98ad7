"""``search``: find images with an aligned model. Each subcommand builds the config and calls one
library function: ``index`` -> search.build.index_gallery, ``query`` -> search.query.Searcher,
``serve`` -> search.server.serve."""

from __future__ import annotations

import json
from typing import Callable

import click

from pipeline.cli import build_config, config_option, config_options, config_values, friendly_errors
from pipeline.config import PipelineConfig
from search.build import index_gallery
from search.query import QueryError, Searcher
from search.server import serve as serve_page

CONTEXT = {"help_option_names": ["-h", "--help"]}
CAPTION_CHARS = 70  # caption shown per result in the plain-text table


def common(func: Callable) -> Callable:
    """--index, --run, --cache, --device, then --config/--set/-v."""
    func = config_options(func)
    for opt in reversed([
        config_option("search.index", "--index", metavar="FOLDER", help="The search index folder."),
        config_option("search.run", "--run", metavar="NAME|FOLDER",
                      help="Aligned model: a run name in --cache, a run folder or an exported model folder "
                           "(index: '' = train.name or the default run name; query/serve: '' = the index's own)."),
        config_option("data.cache", "--cache", help="Feature-cache folder holding the run."),
        config_option("extract.device", "--device", help="Device the encoders run on: auto | cpu | cuda | cuda:N."),
    ]):
        func = opt(func)
    return func


def _config(kw: dict) -> PipelineConfig:
    return build_config(kw.pop("config_path"), kw.pop("overrides"), config_values(kw), kw.pop("verbose"))


@click.group(context_settings=CONTEXT)
def main():
    """Find images with an aligned model: `search index` embeds a gallery, `search query` searches it
    by sentence or image, `search serve` opens a local web page. Run `search COMMAND --help`."""


@main.command("index", context_settings=CONTEXT)
@click.argument("folder", required=False, type=click.Path(file_okay=False))
@click.option("--split", metavar="NAME", help="Index this split of the configured dataset (data.dataset, "
              "data.data_dir) instead of a FOLDER; the run's cached image entry is reused when it matches. [default: none: index FOLDER]")
@config_option("data.dataset", "--dataset", help="Dataset of --split.")
@config_option("data.data_dir", "--data-dir", help="Folder of the dataset of --split.")
@config_option("extract.batch_size", "--batch-size", type=int, help="Images per forward pass.")
@config_option("extract.on_error", "--on-error", help="An image that does not decode: stop, or skip it (logged).")
@config_option("search.exact_max", "--exact-max", type=int,
               help="Galleries of more images also get a faiss index (approximate, faster).")
@config_option("search.nprobe", "--nprobe", type=int,
               help="faiss lists visited per query, at least (doubled until the measured recall@10 is 0.95).")
@common
@friendly_errors
def index_cmd(folder, split, **kw):
    """Embed a gallery and write its index (vectors + index.json with the model's hash, ids, paths,
    captions). FOLDER: every image file under it (captions from imagefolder metadata files, when
    present). Examples: search index photos/ --run demo --cache cache/demo;
    search index --split test --config configs/demo.toml --index search-index
    """
    res = index_gallery(_config(kw), folder, split)
    engine = res["engine"]
    how = "exact search" if engine["name"] == "exact" else (
        f"faiss IVF ({engine['nlist']} lists, nprobe {engine['nprobe']}; recall@10 against exact search "
        f"{engine['recall@10']:.3f} with {engine['recall_queries']} as queries)")
    reused = " (vectors read from the cache)" if res["source"].get("cached") else ""
    click.echo(f"indexed {res['n']} images{reused} with model {res['model']['name']} "
               f"(hash {res['model']['hash'][:12]}) in {res['seconds']:.1f} s: {res['index']}, {how}")
    if res["skipped"]:
        click.echo(f"left out {len(res['skipped'])} images that do not decode (listed in index.json)")


@main.command(context_settings=CONTEXT)
@click.argument("text", required=False)
@click.option("--image", type=click.Path(dir_okay=False), help="Search by this image instead of a sentence. [default: none: search by TEXT]")
@config_option("search.top_k", "--top-k", "-k", type=int, help="Results to show.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (for scripts).")
@common
@friendly_errors
def query(text, image, as_json, **kw):
    """The images of the index closest to TEXT (a sentence) or to --image, with cosine scores.

    Example: search query "a red bicycle" --index search-index -k 5
    """
    if text is not None and image is not None:
        raise QueryError("Give a sentence or --image, not both.")
    if text is None and image is None:
        raise QueryError("Give a sentence to search for (search query \"a red bicycle\") or --image PATH.")
    cfg = _config(kw)
    searcher = Searcher.open(cfg)
    hits = searcher.text(text, cfg.search.top_k) if image is None else searcher.image(image, cfg.search.top_k)
    if as_json:
        doc = {"query": text if image is None else {"image": image}, "index": str(searcher.index.folder),
               "model": searcher.ref.to_json(), "results": [h.to_json() for h in hits]}
        click.echo(json.dumps(doc, ensure_ascii=False, indent=1))
        return
    for h in hits:
        caption = h.captions[0] if h.captions else ""
        caption = caption if len(caption) <= CAPTION_CHARS else caption[:CAPTION_CHARS - 3] + "..."
        click.echo(f"{h.rank:>3}  {h.score:.3f}  {h.id}  {caption}")


@main.command(context_settings=CONTEXT)
@config_option("search.port", "--port", type=int, help="Port on 127.0.0.1 (0 = any free port).")
@config_option("search.top_k", "--top-k", "-k", type=int, help="Results per query on the page.")
@common
@friendly_errors
def serve(**kw):
    """A local web page (http://127.0.0.1:PORT/) to search the index by typing a sentence or dropping
    an image: thumbnails, captions and scores. Ctrl-C stops it.

    Example: search serve --index search-index --port 8765
    """
    serve_page(_config(kw), click.echo)
