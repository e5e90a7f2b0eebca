"""The monolithic worker: takes jobs where the encoder would (``df.work.encode.<model>``, the
same durable consumer), runs encode, denoise and decode in this process, and publishes the
result the decoder would, with the same progress events and per-stage timings.

It runs *instead of* the three stage services (``disagfusion up --monolithic``, or compose's
``monolithic`` profile): beside an encoder it would split the queue with it. Everything else
is the stage worker's: fetch-ahead, batching (by shape, as the DiT needs), heartbeats, drains,
bad input answered with an error result, as are jobs for models nobody serves (``EntryWorker``).
"""

from __future__ import annotations

from disagfusion import limits
from disagfusion.config import Settings
from disagfusion.models.base import Tensors
from disagfusion.protocol import Stage
from disagfusion.worker.stage_worker import Job, StageSeconds
from disagfusion.worker.unserved import EntryWorker
from services.pipeline.model import PipelineModel


def load_pipeline(name: str, stage: str, settings: Settings) -> PipelineModel:
    """Every stage of model ``name`` (the worker's ``ModelLoader``; ``stage`` is where it starts)."""
    return PipelineModel.load(name, settings)


class PipelineWorker(EntryWorker):
    def __init__(self, stage: str, settings: Settings):
        super().__init__(stage, settings, load_pipeline)

    def run_batch(self, batch: list[Job]) -> tuple[list[Tensors], StageSeconds]:
        specs = [job.spec for job in batch]
        seconds: StageSeconds = {}

        def stage_done(stage: Stage, stage_s: float) -> None:
            seconds[stage] = stage_s
            if stage.next is not None:  # the last stage's stage_done follows its outputs, as at the decoder
                self.notify(specs, "stage_done", stage)
                self.notify(specs, "stage_started", stage.next)

        model = self.models[specs[0].model]
        on_step = limits.stop_when_late([job.task for job in batch], self.settings, self.step_events(specs, Stage.DENOISE))
        outputs = model.run(specs, [job.inputs for job in batch], on_step, stage_done)
        return outputs, seconds
