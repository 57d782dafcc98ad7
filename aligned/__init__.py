"""The aligned model as a product: a run's frozen encoders and adapters behind an open_clip-shaped
API (``AlignedModel``), exported to and loaded from a self-contained folder.

    from aligned import AlignedModel
    model = AlignedModel.from_run("demo", cache="cache/demo")      # or AlignedModel.from_pretrained(folder)

Modules: ``model`` (AlignedModel), ``inputs`` (preprocess, tokenizer), ``batches`` (embed_images /
embed_texts), ``sources`` (rebuilding a run's encoders from its recorded entry keys), ``errors``.
"""

from aligned.errors import AlignedError
from aligned.model import AlignedModel
from aligned.sources import EncoderChangedError

__all__ = ["AlignedError", "AlignedModel", "EncoderChangedError"]
