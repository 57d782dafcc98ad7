"""The aligned model's errors: one base, every message one line that says what to do."""

from __future__ import annotations

from pipeline.errors import PipelineError


class AlignedError(PipelineError, ValueError):
    """An aligned model that cannot be built or used as asked: a run without an image or text
    adapter, an encoder that no longer matches its cache entries, an empty text, an export folder
    that was edited or misses its encoder weights."""
