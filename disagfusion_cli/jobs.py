"""The job commands: ``generate`` one image, ``submit`` a batch from a JSONL file, ``cancel`` a job."""

from __future__ import annotations

import asyncio
import io
import json
import mimetypes
import statistics
import time
import zipfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from disagfusion.client import Client
from disagfusion.job_state import CancelPending, JobIdInUse
from disagfusion.limits import LimitError, QueueFull
from disagfusion.protocol import STAGES, JobSpec, OutputFormat, ProgressEvent, Result
from disagfusion_cli.common import (
    DEFAULT_DATA_DIR,
    DataDir,
    client_settings,
    console,
    fail,
    parse_size,
    progress,
    validation_message,
)

T = TypeVar("T")


def generate(
    prompt: str,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File to write (a directory for a video's "
                                                 "PNG frames); default out.<format>.")] = None,
    model: str = "tiny",
    seed: int = 0,
    steps: int = 20,
    size: Annotated[str, typer.Option(help="WIDTHxHEIGHT")] = "256x256",
    frames: Annotated[int, typer.Option(help="More than 1 makes a video (with a video model).")] = 1,
    fps: Annotated[float | None, typer.Option(help="A video's frame rate; default the model's.")] = None,
    output_format: Annotated[OutputFormat | None, typer.Option("--format", help="png, webp (lossless) or mp4; "
                                                                "default png for an image, mp4 for a video.")] = None,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (true CFG for FLUX.1 and "
                                                 "Qwen-Image); 1 turns it off.")] = 4.5,
    embedded_guidance: Annotated[float, typer.Option(help="Guidance fed to a guidance-distilled DiT "
                                                          "(FLUX.1-dev); others ignore it.")] = 3.5,
    negative_prompt: str = "",
    deadline: Annotated[float | None, typer.Option(help="Seconds after submission by which the job must be "
                                                        "done, else it fails; default DF_JOB_DEADLINE_S.")] = None,
    timeout: float = 600.0,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Generate one image or video and write it to OUTPUT."""
    width, height = parse_size(size)
    try:
        spec = JobSpec(
            prompt=prompt, negative_prompt=negative_prompt, model=model, seed=seed, steps=steps,
            width=width, height=height, frames=frames, fps=fps, output_format=output_format,
            guidance=guidance, embedded_guidance=embedded_guidance, deadline_s=deadline,
        )
    except ValidationError as exc:
        fail(validation_message(exc))

    async def run() -> tuple[Result, bytes | None]:
        with progress() as bars:
            bar = bars.add_task("queued", total=steps)

            def on_event(event: ProgressEvent) -> None:
                if event.kind == "step":
                    bars.update(bar, completed=event.step, description="denoising")
                elif event.kind == "stage_started":
                    bars.update(bar, description=event.stage)

            async with Client(client_settings(data_dir), "cli") as client:
                result = await client.generate(spec, on_event, timeout)
                return result, (await client.output(result) if result.status == "ok" else None)

    result, data = _refused_or(run())
    if result.status == "cancelled":
        fail(f"job {result.job_id} was {result.error}")
    if result.status != "ok":
        fail(f"job {result.job_id} failed at {result.stage}: {result.error}")
    written = _write_output(data, result.content_type or "", output or Path(f"out.{spec.output_encoding}"))
    what = f"{result.width}x{result.height}" + (f", {result.frames} frames at {result.fps:g} fps" if result.frames else "")
    stages = ", ".join(f"{k} {v:.2f}s{_batched(result.batch_sizes.get(k, 1))}" for k, v in result.timings.items())
    console.print(f"wrote {written} ({what}); {stages}", soft_wrap=True)


def _refused_or(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; a job over a limit or a full queue ends the command with the reason."""
    try:
        return asyncio.run(work)
    except (LimitError, QueueFull, JobIdInUse) as exc:
        fail(f"refused: {exc}")


def _write_output(data: bytes, content_type: str, output: Path) -> Path:
    """Write a result's bytes to ``output``; a zip of PNG frames is unpacked when ``output``
    is a directory or has no suffix (``-o frames/``)."""
    if content_type == "application/zip" and (output.is_dir() or not output.suffix):
        output.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            archive.extractall(output)
        return output
    output.write_bytes(data)
    return output


def cancel(
    job_id: Annotated[str, typer.Argument(help="The job's id (as submitted, or as the gateway answered it).")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Cancel a queued or running job: stages drop it, and it gets a `cancelled` result."""

    async def run() -> Result | None:
        async with Client(client_settings(data_dir), "cli") as client:
            return await client.cancel(job_id)

    try:
        result = asyncio.run(run())
    except CancelPending as exc:
        fail(str(exc))
    if result is None:
        fail(f"no job {job_id!r}: it has no state and no result")
    if result.status != "cancelled":
        fail(f"job {job_id} finished ({result.status}) before it could be cancelled")
    console.print(f"cancelled job {job_id}")


def load_jobs(path: Path) -> list[JobSpec]:
    """One JobSpec per line (JSON); blank lines and lines starting with # are skipped."""
    specs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            specs.append(JobSpec.model_validate_json(line))
        except ValidationError as exc:
            fail(f"{path}:{number}: {validation_message(exc)}")
    return specs


def submit(
    jobs: Annotated[Path, typer.Argument(help="JSONL file, one job spec per line.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the images and manifest.json.")] = Path("out"),
    timeout: float = 600.0,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Submit a batch of jobs (images and videos may mix), write each one's output (PNG for an
    image and MP4 for a video unless a job's output_format says otherwise) and a manifest with
    per-stage timings."""
    specs = load_jobs(jobs)
    out.mkdir(parents=True, exist_ok=True)
    index = {spec.job_id: i for i, spec in enumerate(specs)}
    manifest: list[dict] = [{} for _ in specs]

    async def run() -> float:
        started = time.time()
        async with Client(client_settings(data_dir), "cli") as client:
            with progress() as bars:
                bar = bars.add_task("generating", total=len(specs))
                async for result in client.run_many(specs, timeout):
                    i = index[result.job_id]
                    entry = {"job_id": result.job_id, "prompt": specs[i].prompt, "status": result.status,
                             "latency_s": result.finished_at - (result.submitted_at or started),
                             "timings": result.timings, "batch_sizes": result.batch_sizes}
                    if result.status == "ok":
                        name = f"{i:04d}-{result.job_id}{mimetypes.guess_extension(result.content_type or '') or ''}"
                        (out / name).write_bytes(await client.output(result))
                        entry["file"] = name
                    else:
                        entry.update(error=result.error, field=result.field, stage=result.stage)
                    manifest[i] = entry
                    bars.advance(bar)
        return time.time() - started

    elapsed = _refused_or(run())
    (out / "manifest.json").write_text(json.dumps({"elapsed_s": elapsed, "jobs": manifest}, indent=2))
    _print_summary(manifest, elapsed, out)


def _print_summary(manifest: list[dict], elapsed: float, out: Path) -> None:
    ok = [m for m in manifest if m["status"] == "ok"]
    console.print(f"{len(ok)}/{len(manifest)} images in {elapsed:.1f} s: {len(ok) / elapsed:.2f} images/s "
                  f"(manifest: {out / 'manifest.json'})")
    for failed in (m for m in manifest if m["status"] != "ok"):
        console.print(f"[red]failed[/red] {failed['job_id']}: {failed['error']}")
    if not ok:
        return
    latencies = sorted(m["latency_s"] for m in ok)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    console.print(f"latency p50 {statistics.median(latencies):.2f} s, p95 {p95:.2f} s")
    split = {stage: statistics.mean(m["timings"].get(stage, 0.0) for m in ok) for stage in STAGES}
    batches = {stage: statistics.mean(m["batch_sizes"].get(stage, 1) for m in ok) for stage in STAGES}
    total = sum(split.values()) or 1.0
    console.print("mean stage time per job: " + ", ".join(
        f"{s} {t:.3f} s ({100 * t / total:.0f}%, batches of {batches[s]:.3g})" for s, t in split.items()))


def _batched(size: int) -> str:
    return f" (batch of {size})" if size > 1 else ""
