"""The last stage: its output is not a tensor for another stage but the job's result."""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np
from PIL import Image

from disagfusion import bus
from disagfusion.protocol import Result
from disagfusion.stage import Job, StageWorker


def encode_png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


class DecoderWorker(StageWorker):
    async def setup(self) -> None:
        self.outputs = await bus.outputs_bucket(self.js)

    async def emit(self, job: Job) -> None:
        spec = job.spec
        image = job.outputs["image"].numpy()
        png = await asyncio.to_thread(encode_png, image)
        result = Result(
            job_id=spec.job_id,
            status="ok",
            content_type="image/png",
            width=image.shape[1],
            height=image.shape[0],
            timings={**job.task.timings, self.stage: job.compute_s},
            submitted_at=job.task.submitted_at,
            finished_at=time.time(),
        )
        if len(png) <= self.settings.result_inline_max_bytes:
            result = result.model_copy(update={"data": png})
        else:
            name = f"{spec.job_id}.png"
            await self.outputs.put(name, png)
            result = result.model_copy(update={"object_name": name})
        await self.publish_event(spec.job_id, "done")
        await self.publish_result(result)
