"""A model family: one kind of pipeline, split into the three stages.

Every family module defines ``FAMILY``, an instance of a ``Family`` subclass, and is registered
by its pipeline class name in ``disagfusion.models.FAMILIES``. Most families are diffusers
pipelines and subclass ``DiffusersFamily``, which declares rather than codes what differs between
them: which components each stage loads, which tensors it hands on, how a spec is checked
(``ImageGeometry``, read from the component configs alone), and the three pieces of arithmetic
that are the family's own (``encode``, ``denoise``, ``decode``). Loading is shared: each stage
builds the stock pipeline with ``from_pretrained`` and every other stage's components left out,
so a preset, a sharded checkpoint and an fp16 variant all load the way diffusers loads them, and
the stage runs the stock pipeline's own code, which is what keeps its pixels identical.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from disagfusion import limits
from disagfusion.config import Settings
from disagfusion.models import resume
from disagfusion.models.base import SpecError, StageModel, StepCallback, Tensors, check_size_multiple
from disagfusion.models.handoff import check_handoff
from disagfusion.protocol import STAGES, JobSpec, TensorRef
from disagfusion.transport.ref import DTYPES

WEIGHT_SUFFIXES = (".safetensors", ".bin")

GuidanceKind = Literal["cfg", "embedded"]
"""How a family is guided. ``cfg``: classifier-free guidance only (``JobSpec.guidance`` > 1 runs
the DiT on the negative prompt too). ``embedded``: guidance-distilled (FLUX.1-dev), where
``JobSpec.embedded_guidance`` is fed to the transformer, and ``guidance`` > 1 adds true CFG."""


class Family(ABC):
    """What the registry needs of any family, diffusers or emulated."""

    name: ClassVar[str]
    """Short name, as in logs and docs (``sd3``, ``flux``)."""
    pipeline_class: ClassVar[str]
    """``model_index.json``'s ``_class_name`` for this family."""

    @abstractmethod
    def check_spec(self, directory: Path, spec: JobSpec) -> None:
        """Raise SpecError if the model in ``directory`` cannot run ``spec``; reads configs only."""

    @abstractmethod
    def load_stage(self, directory: Path, stage: str, settings: Settings) -> StageModel:
        """Load ``stage`` of the model in ``directory``: only that stage's components."""

    @abstractmethod
    def weight_bytes(self, directory: Path, variant: str | None = None) -> dict[str, int]:
        """Bytes of weights each stage loads, from the files alone (for placement)."""


class ImageGeometry(BaseModel):
    """What a still-image spec is checked against, read from the component configs."""

    model_config = ConfigDict(frozen=True)

    family: str
    vae_scale_factor: int
    """Pixels per latent pixel along each side."""
    size_multiple: int
    """Height and width must be multiples of this (the latent factor × the DiT's patch, or what
    the stock pipeline demands)."""
    max_steps: int = 1000
    max_sequence_length: int
    """Prompt tokens the encoder keeps; longer prompts are truncated, as the stock pipeline does."""
    guidance: GuidanceKind = "cfg"

    def check(self, spec: JobSpec) -> None:
        if spec.frames != 1:
            raise SpecError("frames", f"{self.family} makes still images: frames must be 1, not {spec.frames}")
        check_size_multiple(spec, self.size_multiple)
        if spec.steps > self.max_steps:
            raise SpecError("steps", f"at most {self.max_steps} steps for this model's scheduler")


class VideoGeometry(ImageGeometry):
    """A video model's limits: frames come in groups its VAE compresses into one latent frame
    (``temporal_factor``), after a first frame of their own."""

    temporal_factor: int
    max_frames: int = 1024
    fps: float = 16.0
    """The frame rate the model was trained for: its videos' default."""

    def check(self, spec: JobSpec) -> None:
        check_size_multiple(spec, self.size_multiple)
        if (spec.frames - 1) % self.temporal_factor:
            below = (spec.frames - 1) // self.temporal_factor * self.temporal_factor + 1
            raise SpecError("frames", f"{self.family} makes {self.temporal_factor}k + 1 frames: "
                                      f"{spec.frames} is not (try {below} or {below + self.temporal_factor})")
        if spec.frames > self.max_frames:
            raise SpecError("frames", f"at most {self.max_frames} frames for this model")
        if spec.steps > self.max_steps:
            raise SpecError("steps", f"at most {self.max_steps} steps for this model's scheduler")


class DiffusersFamily(Family):
    """A diffusers pipeline split into stages. Subclasses declare the class attributes and write
    ``geometry``, ``encode``, ``denoise`` and ``decode``."""

    stage_components: ClassVar[dict[str, tuple[str, ...]]]
    """Stage -> the ``model_index.json`` components it loads (the others are left out)."""
    handoff: ClassVar[dict[str, tuple[str, ...]]]
    """Stage -> the tensors it hands on per job (those that only some jobs carry included)."""
    prompt_tokenizer: ClassVar[str] = "tokenizer"
    """The tokenizer component whose text length is ``max_sequence_length``: it counts a prompt's
    tokens against DF_MAX_PROMPT_TOKENS (a CLIP beside it always truncates at 77, in the stock
    pipeline too, and is not counted)."""
    resumable: ClassVar[bool] = False
    """Whether a denoise run can be checkpointed and resumed (``disagfusion.models.resume``):
    true for the families whose pipeline loop keeps no state beyond the latents and the
    scheduler, as tested bitwise in tests/models/test_resume.py."""

    @abstractmethod
    def geometry(self, directory: Path) -> ImageGeometry:
        """Read the spec limits from the component configs, without loading any weights."""

    @abstractmethod
    def encode(self, pipe: Any, specs: list[JobSpec]) -> list[Tensors]:
        """Text -> conditioning tensors, one dict per job, each tensor with a batch dimension of 1."""

    @abstractmethod
    def denoise(self, pipe: Any, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback) -> list[Tensors]:
        """Conditioning -> latents, for jobs of one ``shape_key``."""

    @abstractmethod
    def decode(self, pipe: Any, specs: list[JobSpec], inputs: list[Tensors]) -> list[Tensors]:
        """Latents -> ``image`` uint8 [H, W, 3] per job, exactly as the stock pipeline's PIL image."""

    @abstractmethod
    def stock_call(self, pipe: Any, spec: JobSpec, output_type: str = "pil") -> Any:
        """Run ``spec`` through the whole stock pipeline in one call: what the split stages must
        reproduce pixel for pixel, and how this family reads a JobSpec."""

    def prepare(self, stage: str, pipe: Any, directory: Path, settings: Settings) -> None:
        """After loading: any family-specific setup of a stage's pipeline (none by default)."""

    # ---------------------------------------------------------------- shared by every family

    def read_geometry(self, directory: Path) -> ImageGeometry:
        """``geometry``, or one SpecError naming what the directory lacks or cannot give."""
        missing = [f"{name}/ (loaded by {stage})" for stage in STAGES for name in self.missing(directory, stage)]
        if missing:
            raise SpecError("model", f"{self.name} model at {directory} lacks {', '.join(missing)}: "
                                     "not a complete diffusers directory")
        try:
            return self.geometry(directory)
        except (OSError, KeyError, ValueError) as exc:
            raise SpecError("model", f"cannot read the configs of the {self.name} model at {directory}: {exc}") from exc

    def check_spec(self, directory: Path, spec: JobSpec) -> None:
        self.read_geometry(directory).check(spec)

    def load_stage(self, directory: Path, stage: str, settings: Settings) -> StageModel:
        return DiffusersStage(self, stage, Path(directory), settings)

    def components(self, directory: Path) -> dict[str, tuple[str, str]]:
        """``model_index.json``'s components: name -> (library, class name)."""
        index = json.loads((directory / "model_index.json").read_text())
        return {name: tuple(value) for name, value in index.items() if not name.startswith("_") and isinstance(value, list)}

    def missing(self, directory: Path, stage: str) -> list[str]:
        """The components ``stage`` needs that ``directory`` lacks (declared or on disk)."""
        declared = self.components(directory)
        return [
            name for name in self.stage_components[stage]
            if name not in declared or declared[name][0] is None or not (directory / name).is_dir()
        ]

    def pipeline_type(self) -> type:
        return getattr(importlib.import_module("diffusers"), self.pipeline_class)

    def load_pipeline(self, directory: Path, stage: str, settings: Settings, geometry: ImageGeometry) -> Any:
        """The stock pipeline holding only ``stage``'s components, on the configured device."""
        left_out = {name: None for name in self.components(directory) if name not in self.stage_components[stage]}
        try:
            pipe = self.pipeline_type().from_pretrained(
                directory, **left_out, dtype=DTYPES[settings.dtype], variant=settings.variant or None
            )
        except (OSError, ValueError) as exc:  # what diffusers raises for unreadable or absent files
            raise SpecError("model", f"cannot load the {stage} stage of {self.name} model at {directory}: {exc}") from exc
        # Built without a VAE, a stock pipeline assumes the usual scale factor; use the real one.
        pipe.vae_scale_factor = geometry.vae_scale_factor
        pipe.set_progress_bar_config(disable=True)
        if getattr(pipe, "vae", None) is not None and hasattr(pipe.vae, "enable_slicing"):
            # Decode the jobs of a batch one by one: batched convolutions round differently (up
            # to 2/255 in bfloat16 on CPU), and one large image already fills a device.
            pipe.vae.enable_slicing()
        if settings.vae_tiling and getattr(pipe, "vae", None) is not None:
            tile_vae(pipe.vae, settings.vae_tile_size, geometry.vae_scale_factor)
        return pipe.to(settings.device)

    def weight_bytes(self, directory: Path, variant: str | None = None) -> dict[str, int]:
        return {stage: sum(_weight_bytes(directory / name, variant) for name in self.stage_components[stage])
                for stage in STAGES}


def tile_vae(vae: Any, tile: int, scale_factor: int) -> None:
    """Turn on ``vae``'s tiled decoding, with ``tile``-pixel tiles overlapping by a quarter (0:
    the VAE's default tiles). The video VAEs take tile sizes as arguments; AutoencoderKL keeps
    them as attributes. A quarter of a tile must be whole latent pixels, or the tiles' seams do
    not line up and the decoded frame comes out larger than the job's."""
    if tile % (4 * scale_factor):
        raise SpecError("model", f"vae_tile_size {tile} is not a multiple of {4 * scale_factor} "
                                 f"(4 × the VAE's scale factor {scale_factor}): its quarter overlap must be whole latent pixels")
    arguments = inspect.signature(vae.enable_tiling).parameters
    if not tile:
        vae.enable_tiling()
        return
    if "tile_sample_min_height" not in arguments:
        vae.enable_tiling()
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // scale_factor
        vae.tile_overlap_factor = 0.25
        return
    sizes: dict[str, float] = {"tile_sample_min_height": tile, "tile_sample_min_width": tile}
    if "tile_sample_stride_height" in arguments:
        sizes |= {"tile_sample_stride_height": tile * 3 // 4, "tile_sample_stride_width": tile * 3 // 4}
    else:  # CogVideoX: overlap factors (its own are 1/6 and 1/5, which fit its default tiles only)
        sizes |= {"tile_overlap_factor_height": 0.25, "tile_overlap_factor_width": 0.25}
    vae.enable_tiling(**sizes)


def _weight_bytes(folder: Path, variant: str | None) -> int:
    """The bytes diffusers would load from one component folder: the variant's files if it has
    any (``model.fp16.safetensors``, or sharded ``model.fp16-00001-of-00002.safetensors``), else
    the plain ones."""
    files = [path for path in folder.glob("*") if path.suffix in WEIGHT_SUFFIXES]
    if any(path.suffix == ".safetensors" for path in files):  # diffusers prefers them to .bin
        files = [path for path in files if path.suffix == ".safetensors"]
    by_tag: dict[str, int] = {}
    for path in files:
        stem = re.sub(r"-\d+-of-\d+$", "", path.stem)
        tag = stem.rsplit(".", 1)[1] if "." in stem else ""
        by_tag[tag] = by_tag.get(tag, 0) + path.stat().st_size
    return by_tag.get(variant or "", 0) or by_tag.get("", 0)


class DiffusersStage(StageModel):
    """One stage of a diffusers family: checks specs against the family's geometry and runs the
    family's arithmetic for its stage on a pipeline that holds only its own components."""

    def __init__(self, family: DiffusersFamily, stage: str, directory: Path, settings: Settings):
        self.family = family
        self.stage = stage
        self.directory = directory
        self.geometry = family.read_geometry(directory)
        self.max_prompt_tokens = settings.max_prompt_tokens or self.geometry.max_sequence_length
        self.pipe = family.load_pipeline(directory, stage, settings, self.geometry)
        if isinstance(self.geometry, VideoGeometry):
            self.fps = self.geometry.fps
        family.prepare(stage, self.pipe, directory, settings)
        self.resumable = stage == "denoise" and family.resumable and resume.supported(self.pipe.scheduler)

    def check(self, spec: JobSpec) -> None:
        self.geometry.check(spec)
        if self.stage == "encode":
            self._check_prompt_tokens(spec)

    def _check_prompt_tokens(self, spec: JobSpec) -> None:
        """A prompt longer than the limit is an error naming it, not silently truncated (the
        prompt's bytes were checked before, so tokenizing it is cheap)."""
        tokenizer = getattr(self.pipe, self.family.prompt_tokenizer, None)
        if tokenizer is None:
            return
        for field in ("prompt", "negative_prompt") if spec.guided else ("prompt",):
            count = len(tokenizer(getattr(spec, field), add_special_tokens=True, verbose=False).input_ids)
            limits.check_tokens(field, count, self.max_prompt_tokens)

    def check_inputs(self, spec: JobSpec, refs: Mapping[str, TensorRef]) -> None:
        before = STAGES.index(self.stage) - 1
        check_handoff(self.stage, self.family.handoff[STAGES[before]] if before >= 0 else (), spec, refs)

    @torch.no_grad()
    def run(self, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback | None = None) -> list[Tensors]:
        if self.stage == "encode":
            return self.family.encode(self.pipe, specs)
        if any(other.shape_key != specs[0].shape_key for other in specs):
            raise ValueError(f"a {self.stage} batch must hold jobs of one shape_key")
        if self.stage == "denoise":
            inputs, starts = resume.split(inputs)
            if starts and not self.resumable:
                raise ValueError(f"the {self.family.name} denoiser cannot resume a run")
            with resume.DenoiseRun(self.pipe.scheduler, self.pipe.device, starts) as run:
                return self.family.denoise(self.pipe, specs, inputs, run.offset(on_step or (lambda step, total: None)))
        return self.family.decode(self.pipe, specs, inputs)

    def loaded_components(self) -> list[str]:
        """The pipeline components this stage holds (for checks that it loaded only its own)."""
        return sorted(name for name, value in self.pipe.components.items() if value is not None)


# ------------------------------------------------------------------ what families share


def scheduler_config(directory: Path) -> dict:
    """The scheduler's config (diffusers' ``SCHEDULER_CONFIG_NAME``; spelled out so that the
    emulated family, which shares this module, never imports diffusers)."""
    return json.loads((directory / "scheduler" / "scheduler_config.json").read_text())



def generators(specs: list[JobSpec]) -> list[torch.Generator]:
    """One CPU generator per job: each job's noise is drawn exactly as a run of it alone would
    draw it, on any device (the stock pipelines draw CPU-generated noise on CPU too)."""
    return [torch.Generator().manual_seed(spec.seed) for spec in specs]


def denoise_arguments(specs: list[JobSpec]) -> dict[str, Any]:
    """What every stock pipeline is told to denoise a batch of one ``shape_key`` and stop at the
    latents, with one generator per job."""
    spec = specs[0]
    run = resume.current()  # a resumed run starts from its checkpoint's latents
    return dict(num_inference_steps=spec.steps, height=spec.height, width=spec.width,
                generator=generators(specs), output_type="latent", **(run.start_arguments() if run else {}))


def stacked(inputs: list[Tensors], name: str, device: torch.device | str) -> torch.Tensor | None:
    """Tensor ``name`` of every job, concatenated along the batch; None if the jobs lack it."""
    if name not in inputs[0]:
        return None
    return torch.cat([job[name] for job in inputs]).to(device)


def per_job(tensors: dict[str, torch.Tensor | None], count: int) -> list[Tensors]:
    """Split batched tensors into one dict per job, leaving out those that are None."""
    return [{name: t[i : i + 1] for name, t in tensors.items() if t is not None} for i in range(count)]


def with_negatives(specs: list[JobSpec], positives: dict[str, torch.Tensor], negatives: dict[str, torch.Tensor | None]) -> list[Tensors]:
    """One batched encode split per job: each job's own tensors, plus its negatives if it is
    guided. A batch mixing guidance encodes every negative in one call, as the stock pipeline
    encodes one job's; those of unguided jobs are dropped (cheaper than a second call)."""
    jobs = per_job(positives, len(specs))
    negative = per_job(negatives, len(specs))
    return [job | neg if spec.guided else job for spec, job, neg in zip(specs, jobs, negative)]


def add_negatives(specs: list[JobSpec], jobs: list[Tensors], encode: Callable[[list[str]], list[Tensors]]) -> list[Tensors]:
    """Add to ``jobs`` the negatives of the guided jobs only, encoded in one call as the stock
    pipelines encode a list of negative prompts (for families whose encoder takes the negatives
    in a call of their own)."""
    guided = [i for i, spec in enumerate(specs) if spec.guided]
    if guided:
        for i, negative in zip(guided, encode([specs[i].negative_prompt for i in guided])):
            jobs[i] |= negative
    return jobs


def step_reporter(on_step: StepCallback, total: int):
    """A diffusers ``callback_on_step_end`` that reports each finished step."""

    def report(pipe: Any, step_index: int, timestep: object, kwargs: dict) -> dict:
        on_step(step_index + 1, total)
        return {}

    return report


def video_pixels(video: torch.Tensor) -> list[Tensors]:
    """Decoded videos [B, F, C, H, W] in [0, 1] (``VideoProcessor.postprocess_video(...,
    output_type="pt")``) -> per job ``video`` uint8 [F, H, W, 3] and ``image``, its first frame,
    with the float32 arithmetic of ``numpy_to_pil`` (so equal to the stock pipeline's PIL frames)."""
    frames = (video.cpu().permute(0, 1, 3, 4, 2).float() * 255).round().to(torch.uint8)
    return [{"image": frames[i, 0], "video": frames[i]} for i in range(frames.shape[0])]


def image_pixels(image: torch.Tensor, image_processor: Any) -> list[Tensors]:
    """A decoded batch in [-1, 1] -> uint8 [H, W, 3] per job, with the float32 arithmetic of
    ``VaeImageProcessor.pt_to_numpy`` + ``numpy_to_pil`` (so equal to the stock PIL image)."""
    image = image_processor.postprocess(image, output_type="pt")
    pixels = (image.cpu().permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)
    return [{"image": pixels[i]} for i in range(pixels.shape[0])]
