"""Emulated accelerators: stages that hold a pretend device for the time a cost profile gives.

Each stage sleeps in its compute thread (off the worker's event loop) for
``CostProfile.seconds(stage, batch) / DF_EMULATED_SPEED`` and returns tensors of the real
shapes and dtypes, so dozens of emulated instances share a small CPU honestly: queueing,
tensor transfers, batching and scheduling are real; only the kernel time is emulated.
Benchmarks that run on it must say so in their names.

A model directory holds ``model_index.json`` (``_class_name: DisagFusionEmulated`` plus the
``geometry`` below) and ``profile.yaml`` (a ``CostProfile``). Presets:
``emulated`` (PixArt-Sigma shapes, the synthetic bench-pipeline profile) and ``emulated-video``
(Wan2.1-T2V-1.3B shapes, the H200 profile cited in deploy/profiles/wan2_1-t2v-1_3b-h200.yaml).

Tensors per job, as the pixart family gives them: encode -> ``prompt_embeds``
[1, max_sequence_length, text_dim], ``prompt_attention_mask`` [1, max_sequence_length] (int64),
and the ``negative_*`` pair when guidance > 1; denoise -> ``latents`` [1, C, H/f, W/f], or
[1, C, latent_frames, H/f, W/f] when frames > 1; decode -> ``image`` uint8 [H, W, 3] and, when
frames > 1, ``video`` uint8 [frames, H, W, 3] (``image`` is then its first frame).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import xxhash
from pydantic import BaseModel, ConfigDict, Field

from disagfusion.config import Settings
from disagfusion.cost import CostProfile, prompt_tokens
from disagfusion.models import PROFILE_FILE
from disagfusion.models.base import SpecError, StageModel, StepCallback, Tensors, check_size_multiple, write_model_directory
from disagfusion.models.family import Family
from disagfusion.protocol import JobSpec
from disagfusion.transport.ref import DTYPES

CLASS_NAME = "DisagFusionEmulated"


class EmulatedGeometry(BaseModel):
    """The tensor shapes of the pipeline being emulated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text_dim: int = Field(gt=0)
    max_sequence_length: int = Field(gt=0)
    latent_channels: int = Field(gt=0)
    vae_scale_factor: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    temporal_factor: int = Field(default=1, gt=0)
    """Frames per latent frame after the first (Wan's VAE: 4, so frames must be 4k + 1)."""
    max_steps: int = 1000

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal_factor + 1

    def check(self, spec: JobSpec) -> None:
        check_size_multiple(spec, self.size_multiple)
        if (spec.frames - 1) % self.temporal_factor:
            raise SpecError("frames", f"frames must be {self.temporal_factor}k + 1 for this model, not {spec.frames}")
        if spec.steps > self.max_steps:
            raise SpecError("steps", f"at most {self.max_steps} steps for this model")


class EmulatedPreset(BaseModel):
    model_config = ConfigDict(frozen=True)

    geometry: EmulatedGeometry
    profile: str
    """File name (without .yaml) in DF_PROFILES_DIR (deploy/profiles/)."""


PIXART_SIGMA_GEOMETRY = EmulatedGeometry(
    text_dim=4096, max_sequence_length=300, latent_channels=4, vae_scale_factor=8, patch_size=2
)
WAN21_GEOMETRY = EmulatedGeometry(
    text_dim=4096, max_sequence_length=512, latent_channels=16, vae_scale_factor=8, patch_size=2, temporal_factor=4
)

PRESETS: dict[str, EmulatedPreset] = {
    "emulated": EmulatedPreset(geometry=PIXART_SIGMA_GEOMETRY, profile="bench-pipeline"),
    "emulated-video": EmulatedPreset(geometry=WAN21_GEOMETRY, profile="wan2_1-t2v-1_3b-h200"),
}


def write_model(directory: Path, geometry: EmulatedGeometry, profile: CostProfile) -> Path:
    """Write an emulated model directory atomically (several workers may start at once)."""

    def fill(scratch: Path) -> None:
        index = {"_class_name": CLASS_NAME, "geometry": geometry.model_dump()}
        (scratch / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        profile.save(scratch / PROFILE_FILE)

    return write_model_directory(directory, fill)


def init_model(preset: str, directory: Path) -> Path:
    """Write emulated preset ``preset`` to ``directory`` unless something is there already."""
    if preset not in PRESETS:
        raise KeyError(f"unknown emulated preset {preset!r}; presets are {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    return write_model(directory, chosen.geometry, CostProfile.named(chosen.profile))


def read_geometry(directory: Path) -> EmulatedGeometry:
    return EmulatedGeometry.model_validate(json.loads((Path(directory) / "model_index.json").read_text())["geometry"])




def _seed_of(*parts: object) -> int:
    return xxhash.xxh3_64_intdigest(repr(parts).encode()) & (2**63 - 1)


def _pattern(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic values of the full size, cheaply: one seeded row repeated (the bytes are
    all materialised, so transports move the real amount of data)."""
    row = torch.randn(shape[-1], generator=torch.Generator().manual_seed(seed))
    return row.to(dtype).expand(shape).contiguous()


class EmulatedStage(StageModel):
    def __init__(self, directory: Path, settings: Settings):
        self.directory = Path(directory)
        self.geometry = read_geometry(self.directory)
        if not (self.directory / PROFILE_FILE).is_file():
            raise SpecError("model", f"emulated model at {self.directory} has no {PROFILE_FILE} (a directory written "
                                     "before profiles were YAML holds profile.json): delete it, and a preset is written anew")
        self.profile = CostProfile.load(self.directory / PROFILE_FILE)
        self.speed = settings.emulated_speed
        self.dtype = DTYPES[settings.dtype]

    def check(self, spec: JobSpec) -> None:
        self.geometry.check(spec)

    def service_seconds(self, specs: list[JobSpec]) -> float:
        return self.profile.seconds(self.stage, specs) / self.speed

    def hold(self, specs: list[JobSpec], steps: int = 1, on_step: StepCallback | None = None) -> None:
        """Occupy the pretend accelerator for the profiled time, reporting ``steps`` evenly.
        Sleeping to absolute deadlines keeps callback overhead from adding up."""
        started = time.perf_counter()
        total = self.service_seconds(specs)
        for step in range(1, steps + 1):
            time.sleep(max(0.0, started + total * step / steps - time.perf_counter()))
            if on_step is not None:
                on_step(step, steps)


class EmulatedEncoder(EmulatedStage):
    stage = "encode"

    def _embed(self, text: str) -> Tensors:
        g = self.geometry
        mask = torch.zeros(1, g.max_sequence_length, dtype=torch.int64)
        mask[:, : min(g.max_sequence_length, prompt_tokens(text) + 1)] = 1  # + end-of-text token
        shape = (1, g.max_sequence_length, g.text_dim)
        return {"embeds": _pattern(shape, _seed_of("prompt", text), self.dtype), "mask": mask}

    def run(self, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback | None = None) -> list[Tensors]:
        self.hold(specs)
        outputs = []
        for spec in specs:
            positive = self._embed(spec.prompt)
            job = {"prompt_embeds": positive["embeds"], "prompt_attention_mask": positive["mask"]}
            if spec.guidance > 1.0:
                negative = self._embed(spec.negative_prompt)
                job |= {"negative_prompt_embeds": negative["embeds"], "negative_prompt_attention_mask": negative["mask"]}
            outputs.append(job)
        return outputs


class EmulatedDenoiser(EmulatedStage):
    stage = "denoise"

    def run(self, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback | None = None) -> list[Tensors]:
        if any(other.shape_key != specs[0].shape_key for other in specs):
            raise ValueError("a denoise batch must hold jobs of one shape_key")
        self.hold(specs, specs[0].steps, on_step)
        return [{"latents": self._latents(spec, job)} for spec, job in zip(specs, inputs)]

    def _latents(self, spec: JobSpec, job: Tensors) -> torch.Tensor:
        g = self.geometry
        frames = (g.latent_frames(spec.frames),) if spec.frames > 1 else ()
        shape = (1, g.latent_channels, *frames, spec.height // g.vae_scale_factor, spec.width // g.vae_scale_factor)
        # Depends on the seed and on the conditioning received, so a lost input shows.
        conditioning = job["prompt_embeds"].reshape(-1)[:8].float().tolist() if "prompt_embeds" in job else []
        return _pattern(shape, _seed_of(spec.seed, conditioning), self.dtype)


class EmulatedDecoder(EmulatedStage):
    stage = "decode"

    def run(self, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback | None = None) -> list[Tensors]:
        self.hold(specs)
        outputs = []
        for spec, job in zip(specs, inputs):
            shade = _seed_of(job["latents"].reshape(-1)[:8].float().tolist()) % 256
            # Each frame a shade lighter than the one before, so frames differ as a real video's do
            # (an animated-image encoder merges identical frames).
            shades = (shade + torch.arange(spec.frames)) % 256
            video = shades.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, spec.height, spec.width, 3).contiguous()
            outputs.append({"image": video[0]} if spec.frames == 1 else {"image": video[0], "video": video})
        return outputs


STAGE_MODELS: dict[str, type[EmulatedStage]] = {
    stage.stage: stage for stage in (EmulatedEncoder, EmulatedDenoiser, EmulatedDecoder)
}


class EmulatedFamily(Family):
    name = "emulated"
    pipeline_class = CLASS_NAME

    def check_spec(self, directory: Path, spec: JobSpec) -> None:
        read_geometry(directory).check(spec)

    def load_stage(self, directory: Path, stage: str, settings: Settings) -> StageModel:
        return STAGE_MODELS[stage](directory, settings)

    def weight_bytes(self, directory: Path, variant: str | None = None) -> dict[str, int]:
        """Emulated stages hold no weights: the bytes of the model they stand for, as its profile
        gives them (0 where it gives none), so placement treats them as that model."""
        declared = CostProfile.load(directory / PROFILE_FILE).weight_bytes
        return {stage: declared.get(stage, 0) for stage in STAGE_MODELS}


FAMILY = EmulatedFamily()
