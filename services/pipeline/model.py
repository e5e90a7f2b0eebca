"""A model's three stages loaded in one process, run one after the other on a batch."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from disagfusion.config import Settings
from disagfusion.models import load_stage_model
from disagfusion.models.base import StageModel, StepCallback, Tensors
from disagfusion.protocol import STAGES, JobSpec, Stage, TensorRef

StageDone = Callable[[Stage, float], None]
"""Called after each stage with the seconds the batch spent in it."""


class PipelineModel(StageModel):
    """Encode, denoise and decode of one model, each the very ``StageModel`` its stage service
    loads (``load_stage_model``), so the pixels are the disaggregated stack's bit for bit. The
    tensors one stage hands the next stay in memory: no transport, no checksum."""

    def __init__(self, stages: dict[Stage, StageModel]):
        self.stage = Stage.ENCODE  # where its jobs come in
        self.stages = stages
        self.fps = stages[Stage.DECODE].fps

    @classmethod
    def load(cls, name: str, settings: Settings) -> PipelineModel:
        return cls({stage: load_stage_model(name, stage, settings) for stage in STAGES})

    def check(self, spec: JobSpec) -> None:
        for model in self.stages.values():
            model.check(spec)

    def check_inputs(self, spec: JobSpec, refs: Mapping[str, TensorRef]) -> None:
        self.stages[Stage.ENCODE].check_inputs(spec, refs)

    def run(self, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback | None = None,
            on_stage: StageDone | None = None) -> list[Tensors]:
        """``specs`` through every stage (``inputs``: empty dicts, as an encoder's are)."""
        for stage, model in self.stages.items():
            started = time.perf_counter()
            inputs = model.run(specs, inputs, on_step if stage == Stage.DENOISE else None)
            if on_stage is not None:
                on_stage(stage, time.perf_counter() - started)
        return inputs
