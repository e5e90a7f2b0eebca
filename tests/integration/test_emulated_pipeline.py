"""The emulated accelerator family served by the real stage services: jobs flow through NATS
and shm like any model's, each stage taking at least its profiled time."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from disagfusion.client import Client
from disagfusion.cost import CostProfile
from disagfusion.protocol import JobSpec


@pytest.mark.slow
async def test_emulated_jobs_complete_with_profiled_stage_times(start_stack) -> None:
    launcher = start_stack(DF_MODELS="emulated")
    profile = CostProfile.named("bench-pipeline")
    specs = [JobSpec(model="emulated", prompt=f"job {i}", seed=i, steps=4, width=256, height=192,
                     guidance=4.5 if i % 2 else 1.0) for i in range(4)]
    async with Client(launcher.client_settings()) as client:
        results = [r async for r in client.run_many(specs, timeout=120)]
        images = {r.job_id: np.asarray(Image.open(io.BytesIO(await client.output(r)))) for r in results if r.status == "ok"}
    assert sorted(r.job_id for r in results) == sorted(s.job_id for s in specs)
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    for result in results:
        assert images[result.job_id].shape == (192, 256, 3)
        for stage, seconds in profile.job_seconds(specs[0]).items():
            assert result.timings[stage] >= seconds * 0.99, (stage, result.timings)  # sleeping never ends early


@pytest.mark.slow
async def test_a_video_job_gets_every_frame_as_an_animated_webp(start_stack) -> None:
    launcher = start_stack(DF_MODELS="emulated-video")
    spec = JobSpec(model="emulated-video", prompt="a harbour at dawn", frames=9, steps=2, width=64, height=32, guidance=1.0)
    async with Client(launcher.client_settings()) as client:
        result = await client.generate(spec, timeout=120)
        data = await client.output(result)
    assert result.status == "ok", result.error
    assert (result.content_type, result.frames, result.width, result.height) == ("image/webp", 9, 64, 32)
    video = Image.open(io.BytesIO(data))
    assert video.n_frames == 9 and video.size == (64, 32)
