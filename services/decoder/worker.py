"""The last stage: its output is not a tensor for another stage but the job's result, its
pixels encoded as the job asks (``media``): PNG for an image and MP4 for a video by default."""

from __future__ import annotations

import asyncio

from disagfusion import bus
from disagfusion.protocol import Result, output_object_name
from disagfusion.worker.stage_worker import Job, StageWorker
from services.decoder import media


class DecoderWorker(StageWorker):
    async def setup(self) -> None:
        self.outputs = await bus.outputs_bucket(self.js, self.settings.stream_replicas)

    async def emit(self, job: Job) -> None:
        spec = job.spec
        # A video job's decoder hands on every frame; an image is a video of one frame here.
        frames = job.outputs["video" if "video" in job.outputs else "image"].numpy().reshape(
            -1, *job.outputs["image"].shape
        )
        fps = spec.fps or self.models[spec.model].fps
        encoded = await asyncio.to_thread(media.encode, frames, spec.output_encoding, fps)
        if len(encoded.data) <= self.settings.result_inline_max_bytes:
            where = {"data": encoded.data}
        else:
            name = output_object_name(spec.job_id, encoded.extension)
            await self.outputs.put(name, encoded.data)
            where = {"object_name": name}
        count = frames.shape[0]
        video = {"frames": count, "fps": fps, "duration_s": count / fps} if count > 1 else {}
        result = Result.ok(job.task, job.compute_s, job.batch_size, content_type=encoded.content_type,
                           height=frames.shape[1], width=frames.shape[2], **video, **where)
        await self.publish_event(spec.job_id, "done")
        await self.publish_result(result, job.task.replay)
