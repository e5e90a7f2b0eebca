"""What a stage service needs from a model family: check a spec, run a batch of jobs.

A model family splits a pipeline into three ``StageModel`` objects, one per stage, each
loading only its own components. Tensors in and out are plain ``dict[str, torch.Tensor]``
per job, so the worker can ship them through any transport without knowing what they mean.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from disagfusion.errors import DisagFusionError
from disagfusion.protocol import JobSpec, TensorRef

Tensors = dict[str, torch.Tensor]
P = TypeVar("P")
StepCallback = Callable[[int, int], None]
"""Called as ``on_step(step, total)`` after each denoising step, from the compute thread."""


class SpecError(DisagFusionError, ValueError):
    """A job this model cannot run as asked; ``field`` names the JobSpec field to fix."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class StageModel(ABC):
    stage: str
    fps: float = 16.0
    """The frame rate of this model's videos, unless a job asks for another (Wan's 16 by default)."""
    resumable: bool = False
    """Whether this (denoise) stage checkpoints and resumes runs: ``disagfusion.models.resume``."""

    @abstractmethod
    def check(self, spec: JobSpec) -> None:
        """Raise SpecError if this model cannot run ``spec``. Cheap: called before any work."""

    def check_inputs(self, spec: JobSpec, refs: Mapping[str, TensorRef]) -> None:
        """Raise SpecError if the tensors a task names for this stage are not what it takes.
        Cheap: called on the refs, before any byte is fetched. Nothing is checked by default."""

    @abstractmethod
    def run(self, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback | None = None) -> list[Tensors]:
        """Run a batch of jobs. ``inputs[i]`` is job i's output of the previous stage (empty for
        the encoder); the result's element i is job i's output. Batches given to denoise and
        decode hold jobs with the same ``JobSpec.shape_key``."""


class UnloadableModel(StageModel):
    """Stands in for a model its stage could not load (a wrong path, a missing component): every
    job for it is answered with that error, so nothing waits in the queue for a model that will
    never come, and the worker's other models keep serving."""

    def __init__(self, stage: str, error: SpecError):
        self.stage = stage
        self.error = error

    def check(self, spec: JobSpec) -> None:
        raise self.error

    def run(self, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback | None = None) -> list[Tensors]:
        raise self.error


def check_size_multiple(spec: JobSpec, multiple: int) -> None:
    """Height and width must be multiples of ``multiple`` (latent factor × patch size)."""
    for field in ("height", "width"):
        value = getattr(spec, field)
        if value % multiple:
            nearest = max(multiple, round(value / multiple) * multiple)
            raise SpecError(field, f"{value} is not a multiple of {multiple} for this model (try {nearest})")


def write_model_directory(directory: Path, fill: Callable[[Path], None]) -> Path:
    """Create ``directory`` with ``fill(scratch)`` unless it exists; return it.

    Several processes may start on the same directory at once: each fills a private temporary
    copy and renames it into place, which is atomic; the losers delete their copy.
    """
    directory = Path(directory)
    if directory.exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        fill(scratch)
        try:
            os.rename(scratch, directory)
        except OSError:
            if not (directory / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return directory


def write_preset(presets: Mapping[str, P], name: str, directory: Path, build: Callable[[P], Any]) -> Path:
    """Write preset ``name`` of ``presets`` (a pipeline ``build`` makes, saved with
    ``save_pretrained``) to ``directory``, unless something is there already; return it."""
    if name not in presets:
        raise KeyError(f"unknown preset {name!r}; presets are {', '.join(presets)}")
    return write_model_directory(directory, lambda scratch: build(presets[name]).save_pretrained(scratch))


# Preset weights come from the process-wide torch RNG; two threads seeding it at once would mix streams.
_rng_lock = threading.Lock()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Initialise modules created inside from ``seed`` alone, leaving the global RNG as it was."""
    with _rng_lock, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
