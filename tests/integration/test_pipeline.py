"""A job through three separate service processes comes out pixel-identical to the stock
diffusers pipeline run in-process, and a burst of jobs gets exactly one result each."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from disagfusion.client import Client
from disagfusion.protocol import RESULTS_STREAM, JobSpec, TimingSample, metrics_subject, unpack

CASES = [
    # (width, height, steps, guidance)
    (64, 64, 4, 4.5),
    (96, 64, 3, 1.0),
    (64, 128, 5, 7.0),
]


async def _generate_all(launcher, specs: list[JobSpec]) -> dict[str, np.ndarray]:
    images = {}
    async with Client(launcher.client_settings()) as client:
        async for result in client.run_many(specs, timeout=120):
            assert result.status == "ok", result.error
            images[result.job_id] = np.asarray(Image.open(io.BytesIO(await client.output(result))))
    return images


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_split_pipeline_is_pixel_identical_to_diffusers(dtype: str, start_stack, stock_image) -> None:
    specs = [
        JobSpec(prompt=f"a tiny test image number {i}", seed=100 + i, steps=steps, width=w, height=h, guidance=g)
        for i, (w, h, steps, g) in enumerate(CASES)
    ]
    images = await _generate_all(start_stack(DF_DTYPE=dtype), specs)
    for spec in specs:
        expected = stock_image(spec, dtype)
        got = images[spec.job_id]
        assert got.shape == (spec.height, spec.width, 3)
        assert np.array_equal(got, expected), (
            f"{spec.width}x{spec.height} guidance {spec.guidance}: "
            f"{np.count_nonzero(got != expected)} pixels differ"
        )


@pytest.mark.slow
async def test_burst_with_two_dit_processes_gets_exactly_one_result_per_job(start_stack) -> None:
    specs = [JobSpec(prompt=f"burst {i}", seed=i, steps=2, width=64, height=64) for i in range(30)]
    dit_workers: set[str] = set()
    launcher = start_stack({"dit": 2})
    assert launcher.running()["dit"] == 2
    async with Client(launcher.client_settings()) as client:

        async def seen(msg) -> None:
            dit_workers.add(unpack(TimingSample, msg.data).worker)

        await client._bus.nc.subscribe(metrics_subject("denoise"), cb=seen)
        ok = [r.job_id async for r in client.run_many(specs, timeout=120) if r.status == "ok"]
        info = await client._js.stream_info(RESULTS_STREAM, subjects_filter="df.results.>")
    assert sorted(ok) == sorted(s.job_id for s in specs)
    counts = info.state.subjects
    assert len(counts) == 30 and set(counts.values()) == {1}, counts
    assert len(dit_workers) == 2, f"only {dit_workers} did denoising work"


@pytest.mark.slow
async def test_batched_jobs_match_their_unbatched_images(start_stack, stock_image) -> None:
    """With batching on at every stage, each job still gets its own image: equal to the stock
    pipeline's within 1/255 per pixel (fp32 batched matmuls may round differently)."""
    launcher = start_stack(DF_MAX_BATCH="4", DF_MAX_BATCH_WAIT_MS="500")
    shapes = [(64, 64), (64, 96)]
    specs = [JobSpec(prompt=f"batched {i}", seed=i, steps=3, width=w, height=h) for i, (w, h) in
             enumerate(shapes * 4)]
    batch_sizes: list[int] = []
    async with Client(launcher.client_settings()) as client:

        async def seen(msg) -> None:
            batch_sizes.append(unpack(TimingSample, msg.data).batch)

        await client._bus.nc.subscribe(metrics_subject("denoise"), cb=seen)
        images = await _generate_all(launcher, specs)
    assert max(batch_sizes) > 1, f"no denoise batch formed: {batch_sizes}"
    for spec in specs:
        expected = stock_image(spec).astype(int)
        assert np.abs(images[spec.job_id].astype(int) - expected).max() <= 1


@pytest.mark.slow
async def test_large_outputs_go_through_the_object_store(start_stack, stock_image) -> None:
    launcher = start_stack(DF_RESULT_INLINE_MAX_BYTES="0")  # every PNG counts as large
    spec = JobSpec(prompt="stored", steps=2, width=64, height=64)
    async with Client(launcher.client_settings()) as client:
        result = await client.generate(spec, timeout=60)
        assert result.status == "ok" and result.data is None and result.object_name == f"{spec.job_id}.png"
        png = await client.output(result)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), stock_image(spec))
