"""What a stage accepts from the stage before it, checked on the task's ``TensorRef``s before a
byte is fetched or the model sees anything: a task published straight onto a later stage's
subject (by a client, or a broken producer) is answered with an error naming the tensor,
instead of failing deep inside a transformer.

The rules hold for every diffusers family (each declares its ``handoff`` names): per job, every
tensor has a batch dimension of 1; masks are integer or bool and as long as their embeddings;
everything else is floating point; the ``negative_`` tensors come exactly when the job is
guided. Exact sizes (sequence length, hidden width, latent channels) are the model's own and
are left to it.
"""

from __future__ import annotations

from collections.abc import Mapping

from disagfusion.models.base import SpecError
from disagfusion.protocol import JobSpec, TensorRef

FLOATING = {"float32", "float16", "bfloat16", "float64"}
MASKS = {"int64", "int32", "int16", "int8", "uint8", "bool"}
NEGATIVE = "negative_"
RANKS = {"prompt_embeds": 3, "pooled_prompt_embeds": 2, "prompt_attention_mask": 2}
"""Dimensions of the tensors whose rank every family agrees on (``negative_`` ones alike)."""


def check_handoff(stage: str, names: tuple[str, ...], spec: JobSpec, refs: Mapping[str, TensorRef]) -> None:
    """Raise SpecError (field ``tensors`` or ``tensors.<name>``) unless ``refs`` is what ``stage``
    takes: the tensors ``names`` of the stage before it, as ``spec`` needs them."""
    expected = {name for name in names if spec.guided or not name.startswith(NEGATIVE)}
    unexpected = sorted(set(refs) - expected)
    if unexpected:
        takes = ", ".join(sorted(expected)) or "no tensors"
        raise SpecError("tensors", f"stage {stage} of {spec.model} takes {takes} for this job; "
                                   f"the task also names {', '.join(unexpected)}")
    missing = sorted(expected - set(refs))
    if missing:
        raise SpecError("tensors", f"stage {stage} of {spec.model} needs {', '.join(missing)}, which the task lacks")
    for name, ref in refs.items():
        _check_tensor(name, ref, refs)


def _check_tensor(name: str, ref: TensorRef, refs: Mapping[str, TensorRef]) -> None:
    def wrong(why: str) -> SpecError:
        return SpecError(f"tensors.{name}", f"{why} (shape {ref.shape}, dtype {ref.dtype})")

    if not ref.shape or ref.shape[0] != 1:
        raise wrong("must have a batch dimension of 1: one tensor per job")
    rank = RANKS.get(name.removeprefix(NEGATIVE))
    if rank is not None and len(ref.shape) != rank:
        raise wrong(f"must have {rank} dimensions")
    if name.endswith("_mask"):
        if ref.dtype not in MASKS:
            raise wrong("a mask must be integer or bool")
        embeds = refs.get(name.removesuffix("_attention_mask") + "_embeds")
        if embeds is not None and embeds.shape[:2] != ref.shape:
            raise wrong(f"must match its embeddings' first dimensions {embeds.shape[:2]}")
    elif ref.dtype not in FLOATING:
        raise wrong("must be floating point")
