"""The emulated accelerator family served by the real stage services: jobs flow through NATS
and shm like any model's, each stage taking at least its profiled time."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from disagfusion.client import Client
from disagfusion.cost import CostProfile
from disagfusion.protocol import JobSpec
from disagfusion_cli import app

# A stack serving many models: `make test-stacks` runs it, not `make test` (docs in the Makefile).
pytestmark = pytest.mark.stacks

runner = CliRunner()


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
async def test_a_video_job_gets_every_frame_in_the_format_it_asks_for(start_stack) -> None:
    """MP4 by default; lossless animated WebP and a zip of PNG frames on request, each holding
    the same frames, bit for bit, and the MP4 the same number of frames at the asked rate."""
    launcher = start_stack(DF_MODELS="emulated-video")
    base = JobSpec(model="emulated-video", prompt="a harbour at dawn", frames=9, steps=2, width=64, height=32, guidance=1.0)
    specs = [base.model_copy(update={"job_id": f"{base.job_id}-{fmt or 'default'}", "output_format": fmt, "fps": 8.0})
             for fmt in (None, "webp", "png")]
    async with Client(launcher.client_settings()) as client:
        results = {r.job_id: r async for r in client.run_many(specs, timeout=120)}
        data = {job_id: await client.output(r) for job_id, r in results.items()}
    mp4, webp, png = (results[spec.job_id] for spec in specs)
    for result in (mp4, webp, png):
        assert result.status == "ok", result.error
        assert (result.frames, result.width, result.height, result.fps, result.duration_s) == (9, 64, 32, 8.0, 1.125)
    assert (mp4.content_type, webp.content_type, png.content_type) == ("video/mp4", "image/webp", "application/zip")
    animated = Image.open(io.BytesIO(data[webp.job_id]))
    lossless = []
    for index in range(animated.n_frames):
        animated.seek(index)
        lossless.append(np.asarray(animated.convert("RGB")))
    with zipfile.ZipFile(io.BytesIO(data[png.job_id])) as archive:
        assert archive.namelist() == [f"{i:05d}.png" for i in range(9)]
        frames = [np.asarray(Image.open(io.BytesIO(archive.read(name)))) for name in archive.namelist()]
    np.testing.assert_array_equal(np.stack(frames), np.stack(lossless))
    with av.open(io.BytesIO(data[mp4.job_id])) as container:
        stream = container.streams.video[0]
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert stream.average_rate == 8
    assert len(decoded) == 9 and decoded[0].shape == (32, 64, 3)


@pytest.mark.slow
def test_the_cli_writes_videos_and_a_mixed_batch(start_stack, tmp_path: Path) -> None:
    """``generate --frames 9 -o clip.mp4``, ``-o frames/ --format png``, and ``submit`` of image
    and video jobs together, as a user types them."""
    launcher = start_stack(DF_MODELS="tiny,emulated-video")
    common = ["--model", "emulated-video", "--frames", "9", "--steps", "2", "--size", "64x32", "--guidance", "1",
              "--data-dir", str(launcher.data_dir)]
    clip = tmp_path / "clip.mp4"
    done = runner.invoke(app, ["generate", "a harbour", "-o", str(clip), "--fps", "12", *common])
    assert done.exit_code == 0, done.output
    assert "9 frames at 12 fps" in " ".join(done.output.split())
    with av.open(str(clip)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9
    frames_dir = tmp_path / "frames"
    done = runner.invoke(app, ["generate", "a harbour", "-o", str(frames_dir), "--format", "png", *common])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in frames_dir.iterdir()) == [f"{i:05d}.png" for i in range(9)]

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        '{"prompt": "an image", "steps": 2, "width": 64, "height": 64}\n'
        '{"model": "emulated-video", "prompt": "a video", "frames": 9, "steps": 2, "width": 64, "height": 32}\n'
        '{"model": "emulated-video", "prompt": "frames", "frames": 5, "steps": 2, "width": 64, "height": 32,'
        ' "output_format": "webp"}\n'
    )
    out = tmp_path / "out"
    done = runner.invoke(app, ["submit", str(jobs), "--out", str(out), "--data-dir", str(launcher.data_dir)])
    assert done.exit_code == 0, done.output
    manifest = json.loads((out / "manifest.json").read_text())["jobs"]
    assert [job["status"] for job in manifest] == ["ok"] * 3
    assert [Path(job["file"]).suffix for job in manifest] == [".png", ".mp4", ".webp"]
