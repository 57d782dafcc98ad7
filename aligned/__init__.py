"""The aligned model as a product: a run's frozen encoders and adapters behind an open_clip-shaped
API (``AlignedModel``), exported to and loaded from a self-contained folder.

    from aligned import AlignedModel
    model = AlignedModel.from_run("demo", cache="cache/demo")      # or AlignedModel.from_pretrained(folder)

Modules: ``model`` (AlignedModel), ``inputs`` (preprocess, tokenizer), ``batches`` (embed_images /
embed_texts), ``sources`` (rebuilding a run's encoders from its recorded entry keys), ``export``
(writing a folder), ``folder`` (its layout, verifying and reading it), ``card`` (its README.md),
``cli`` (the ``export`` command), ``errors``.
"""

from aligned.errors import AlignedError
from aligned.export import export
from aligned.folder import verify_folder
from aligned.model import AlignedModel
from aligned.sources import EncoderChangedError

__all__ = ["AlignedError", "AlignedModel", "EncoderChangedError", "export", "verify_folder"]
