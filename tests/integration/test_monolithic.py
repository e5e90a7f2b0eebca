"""The monolithic stack (``disagfusion up --monolithic``: the pipeline service alone, on the
encoder's queue) makes the stock pipeline's pixels, bit for bit, as the disaggregated stack
does, with the same result fields and progress events; bad input still ends in an error result."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
from PIL import Image

from disagfusion import bus
from disagfusion.client import Client
from disagfusion.launcher import Launcher
from disagfusion.protocol import STAGES, WORK_STREAM, JobSpec, ProgressEvent, consumer_name, new_job_id, task_msg_id, work_subject
from tests.integration.conftest import running_stack


@pytest.fixture(scope="module")
def mono_stack(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Launcher]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DF_MODELS", "tiny")
        with running_stack(tmp_path_factory.mktemp("mono"), tiny_models_dir, monolithic=True) as launcher:
            yield launcher


def test_the_pipeline_service_runs_instead_of_the_stages(mono_stack: Launcher) -> None:
    assert mono_stack.running() == {"pipeline": 1, "gateway": 1}  # the gateway fronts either stack
    # A launcher opened on the running stack (down, scale) knows it is monolithic.
    assert Launcher(mono_stack.data_dir).services.keys() == {"pipeline", "gateway"}


async def test_images_are_the_stock_pipelines_bit_for_bit(mono_stack: Launcher, stock_image) -> None:
    specs = [
        JobSpec(prompt="a lighthouse on a cliff", negative_prompt="blurry", seed=3, steps=3, width=64, height=64),
        JobSpec(prompt="a red boat", seed=4, steps=3, width=96, height=64, guidance=1.0),
        JobSpec(prompt="fog over a long and winding river at dawn", seed=5, steps=2, width=64, height=96),
    ]
    events: dict[str, list[ProgressEvent]] = {spec.job_id: [] for spec in specs}
    async with Client(mono_stack.client_settings()) as client:
        results = await asyncio.gather(*(
            client.generate(spec, on_event=events[spec.job_id].append, timeout=120) for spec in specs
        ))
        pngs = [await client.output(result) for result in results]
    for spec, result, png in zip(specs, results, pngs, strict=True):
        assert result.status == "ok", result.error
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), stock_image(spec))
        # The disaggregated stack's result fields: every stage's time, batch size and the last stage.
        assert result.stage == "decode" and (result.width, result.height) == (spec.width, spec.height)
        assert list(result.timings) == list(STAGES) and all(s > 0 for s in result.timings.values())
        assert result.batch_sizes == dict.fromkeys(STAGES, 1)
        kinds = [(e.kind, e.stage) for e in events[spec.job_id] if e.kind != "step"]
        assert kinds == [(kind, stage) for stage in STAGES for kind in ("stage_started", "stage_done")] + [("done", "decode")]
        steps = [(e.stage, e.step) for e in events[spec.job_id] if e.kind == "step"]
        assert sorted(steps, key=lambda s: s[1]) == [("denoise", i) for i in range(1, spec.steps + 1)]


@pytest.mark.parametrize(("changes", "field"), [({"steps": 0}, "steps"), ({"width": 100}, "width"),
                                                 ({"model": "nosuchmodel"}, "model")])
async def test_bad_input_gets_an_error_result_and_is_terminated(mono_stack: Launcher, changes, field) -> None:
    job = {**JobSpec(prompt="x", steps=2, width=64, height=64).model_dump(mode="python"), "job_id": new_job_id(), **changes}
    model = job["model"]
    async with Client(mono_stack.client_settings()) as client:
        payload = msgpack.packb({"v": 1, "job": job, "stage": "encode"})
        await bus.publish(client._js, work_subject("encode", model), payload, task_msg_id(job["job_id"], "encode"))
        result = await client.result(job["job_id"], timeout=10)
        assert result.status == "error" and result.field == field, result.error
        for _ in range(50):  # the result comes before the message is terminated
            info = await client._js.stream_info(WORK_STREAM, subjects_filter=work_subject("encode", model))
            if not info.state.subjects:
                break
            await asyncio.sleep(0.1)
        assert not info.state.subjects, f"left in the work queue: {info.state.subjects}"
        consumer = await client._js.consumer_info(WORK_STREAM, consumer_name("encode", "tiny"))
        assert consumer.num_ack_pending == 0 and consumer.num_redelivered == 0
