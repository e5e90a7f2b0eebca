"""The first stage, which batches any prompts of a model and answers jobs sent for a model
nobody serves (``disagfusion.worker.unserved``)."""

from __future__ import annotations

from disagfusion.worker import policy
from disagfusion.worker.unserved import EntryWorker


class EncoderWorker(EntryWorker):
    batch_key = staticmethod(policy.by_model)
    """A text encoder pads every prompt to one length, so any prompts of a model share a batch."""
