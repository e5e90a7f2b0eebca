"""Running a model's stages in-process the way the services do: each stage's outputs cross a
byte boundary (as through any transport) before the next stage takes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from disagfusion.config import Settings
from disagfusion.models import check_spec
from disagfusion.models.base import SpecError, StageModel, Tensors
from disagfusion.protocol import STAGES, JobSpec
from disagfusion.transport.ref import DTYPE_NAMES, tensor_bytes, tensor_from_buffer


def handoff(tensors: Tensors) -> Tensors:
    """What a transport does: raw bytes out, a new tensor over a copy of them in."""
    return {
        name: tensor_from_buffer(tensor_bytes(t).tobytes(), DTYPE_NAMES[t.dtype], list(t.shape))
        for name, t in tensors.items()
    }


def generate(stages: dict[str, StageModel], specs: list[JobSpec]) -> list[np.ndarray]:
    """The images the split stages make for ``specs`` run as one batch."""
    tensors: list[Tensors] = [{} for _ in specs]
    for stage in STAGES:
        tensors = [handoff(t) for t in stages[stage].run(specs, tensors)]
    return [t["image"].numpy() for t in tensors]


def assert_stock_image(stages: dict[str, StageModel], spec: JobSpec, expected: np.ndarray) -> None:
    """The split stages make ``expected`` (the stock pipeline's image for ``spec``), bit for bit."""
    [image] = generate(stages, [spec])
    assert image.dtype == np.uint8 and image.shape == (spec.height, spec.width, 3)
    np.testing.assert_array_equal(image, expected)


def denoised(stages: dict[str, StageModel], spec: JobSpec) -> torch.Tensor:
    """The latents the denoiser hands on for ``spec`` alone."""
    [latents] = stages["denoise"].run([spec], [handoff(t) for t in stages["encode"].run([spec], [{}])])
    return latents["latents"]


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def assert_batch_like_each_alone(stages: dict[str, StageModel], specs: list[JobSpec], what: str) -> None:
    """``specs`` run as one batch make each job's image alone within 1/255 (batched arithmetic
    rounds differently), and no job gets another's image."""
    batched = generate(stages, specs)
    alone = [generate(stages, [spec])[0] for spec in specs]
    worst = max(max_difference(a, b) for a, b in zip(batched, alone))
    print(f"{what}: batched vs alone, max difference {worst}/255")
    assert worst <= 1
    assert not np.array_equal(batched[0], batched[2])  # the jobs did not get one another's images


def generate_video(stages: dict[str, StageModel], specs: list[JobSpec]) -> list[dict[str, np.ndarray]]:
    """What the split stages of a video family make for ``specs`` run as one batch: each job's
    outputs by name (``video`` [F, H, W, 3], ``image`` its first frame)."""
    tensors: list[Tensors] = [{} for _ in specs]
    for stage in STAGES:
        tensors = [handoff(t) for t in stages[stage].run(specs, tensors)]
    return [{name: t.numpy() for name, t in job.items()} for job in tensors]


def frames(stages: dict[str, StageModel], spec: JobSpec) -> np.ndarray:
    """The frames [F, H, W, 3] the split stages make for ``spec`` alone."""
    [out] = generate_video(stages, [spec])
    return out["video"]


def assert_refused(stages: dict[str, StageModel], spec: JobSpec, field: str, settings: Settings) -> None:
    """Every stage, and ``check_spec`` before any is loaded, refuse ``spec`` naming ``field``."""
    for stage in stages.values():
        with pytest.raises(SpecError) as error:
            stage.check(spec)
        assert error.value.field == field
    with pytest.raises(SpecError) as error:
        check_spec(spec, settings)
    assert error.value.field == field
