"""The last stage: its output is not a tensor for another stage but the job's result: a PNG for
an image, a lossless animated WebP for a video (the decoder's ``video`` tensor)."""

from __future__ import annotations

import asyncio
import io

import numpy as np
from PIL import Image

from disagfusion import bus
from disagfusion.protocol import Result, output_object_name
from disagfusion.worker.stage_worker import Job, StageWorker

VIDEO_FPS = 16
"""Frame rate written into animated outputs until a job can ask for one."""


def encode_png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def encode_webp(video: np.ndarray, fps: int = VIDEO_FPS) -> bytes:
    """Frames [F, H, W, 3] as a lossless animated WebP: every frame's pixels come back exactly."""
    frames = [Image.fromarray(frame) for frame in video]
    out = io.BytesIO()
    frames[0].save(out, format="WEBP", save_all=True, append_images=frames[1:], lossless=True,
                   duration=round(1000 / fps), loop=0)
    return out.getvalue()


class DecoderWorker(StageWorker):
    async def setup(self) -> None:
        self.outputs = await bus.outputs_bucket(self.js)

    async def emit(self, job: Job) -> None:
        if "video" in job.outputs:
            video = job.outputs["video"].numpy()
            data = await asyncio.to_thread(encode_webp, video)
            kind, extension, (frames, height, width) = "image/webp", "webp", video.shape[:3]
        else:
            image = job.outputs["image"].numpy()
            data = await asyncio.to_thread(encode_png, image)
            kind, extension, (height, width), frames = "image/png", "png", image.shape[:2], None
        if len(data) <= self.settings.result_inline_max_bytes:
            where = {"data": data}
        else:
            name = output_object_name(job.spec.job_id, extension)
            await self.outputs.put(name, data)
            where = {"object_name": name}
        result = Result.ok(job.task, job.compute_s, job.batch_size, content_type=kind, width=width, height=height,
                           frames=frames, **where)
        await self.publish_event(job.spec.job_id, "done")
        await self.publish_result(result)
