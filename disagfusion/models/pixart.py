"""PixArt-Sigma split into three stages: encode (T5), denoise (DiT + scheduler), decode (VAE).

Each stage loads only its own components, each with ``from_pretrained(DIR/<subfolder>)``, so
a preset and a real PixArt-Sigma checkpoint load the same way. The stages reuse the stock
``PixArtSigmaPipeline`` code (built with the other components left out) so a split run gives
the same pixels as the stock pipeline run in one process.

Tensors per job (each with a leading batch dimension of 1, as the stock pipeline takes them):
encode -> ``prompt_embeds``, ``prompt_attention_mask`` and, when guidance > 1 (classifier-free
guidance is on only then), ``negative_prompt_embeds``, ``negative_prompt_attention_mask``;
denoise -> ``latents``; decode -> ``image``, uint8 [H, W, 3].
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, PixArtSigmaPipeline, PixArtTransformer2DModel
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import PixArtImageProcessor
from diffusers.schedulers.scheduling_utils import SCHEDULER_CONFIG_NAME
from pydantic import BaseModel, ConfigDict
from transformers import AutoTokenizer, T5EncoderModel

from disagfusion.config import Settings
from disagfusion.engram.module import attach_engram
from disagfusion.models.base import SpecError, StageModel, StepCallback, Tensors, check_size_multiple
from disagfusion.protocol import JobSpec
from disagfusion.transport.ref import DTYPES

MAX_SEQUENCE_LENGTH = 300
"""PixArt-Sigma's prompt length in tokens; prompts are padded (or truncated) to it."""

# The stock pipeline itself rejects sizes that are not multiples of 8, whatever the VAE.
PIPELINE_SIZE_MULTIPLE = 8


def scheduler_config(directory: Path) -> dict:
    return json.loads((directory / "scheduler" / SCHEDULER_CONFIG_NAME).read_text())


class PixArtGeometry(BaseModel):
    """What a spec is checked against, read from the component configs without any weights."""

    model_config = ConfigDict(frozen=True)

    vae_scale_factor: int
    patch_size: int
    num_train_timesteps: int

    @classmethod
    def read(cls, directory: Path) -> PixArtGeometry:
        vae = AutoencoderKL.load_config(directory / "vae")
        transformer = PixArtTransformer2DModel.load_config(directory / "transformer")
        scheduler = scheduler_config(directory)
        return cls(
            vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
            patch_size=transformer["patch_size"],
            num_train_timesteps=scheduler["num_train_timesteps"],
        )

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: one DiT patch of latent pixels."""
        return math.lcm(self.vae_scale_factor * self.patch_size, PIPELINE_SIZE_MULTIPLE)

    def check(self, spec: JobSpec) -> None:
        if spec.frames != 1:
            raise SpecError("frames", f"pixart makes still images: frames must be 1, not {spec.frames}")
        check_size_multiple(spec, self.size_multiple)
        if spec.steps > self.num_train_timesteps:
            raise SpecError("steps", f"at most {self.num_train_timesteps} steps for this model's scheduler")


def check_spec(directory: Path, spec: JobSpec) -> None:
    """Validate ``spec`` against the model in ``directory`` from its configs alone."""
    PixArtGeometry.read(directory).check(spec)


class PixArtStage(StageModel):
    """Shared by the three stages. ``check`` is the whole model's check on every stage, so the
    encoder already rejects a size that only the DiT or the VAE could not handle."""

    def __init__(self, directory: Path, settings: Settings):
        self.directory = Path(directory)
        self.geometry = PixArtGeometry.read(self.directory)
        self.device = torch.device(settings.device)
        self.dtype = DTYPES[settings.dtype]

    def check(self, spec: JobSpec) -> None:
        self.geometry.check(spec)

    def _partial_pipeline(self, **components: object) -> PixArtSigmaPipeline:
        """The stock pipeline holding only this stage's components."""
        parts = dict(tokenizer=None, text_encoder=None, vae=None, transformer=None, scheduler=None)
        pipe = PixArtSigmaPipeline(**(parts | components))
        # Built without a VAE, the pipeline would assume a scale factor of 8.
        pipe.vae_scale_factor = self.geometry.vae_scale_factor
        pipe.set_progress_bar_config(disable=True)
        return pipe


class PixArtEncoder(PixArtStage):
    stage = "encode"

    def __init__(self, directory: Path, settings: Settings):
        super().__init__(directory, settings)
        text_encoder = T5EncoderModel.from_pretrained(self.directory / "text_encoder", dtype=self.dtype)
        tokenizer = AutoTokenizer.from_pretrained(self.directory / "tokenizer")
        text_encoder = text_encoder.to(self.device).eval()
        # With DF_ENGRAM_ARENA set, Engram layers join the text encoder; their rows are
        # prefetched the moment the tokenized prompt reaches it (a forward pre-hook).
        self.engram = attach_engram(text_encoder, settings, self.directory / "text_encoder", tokenizer)
        self.pipe = self._partial_pipeline(tokenizer=tokenizer, text_encoder=text_encoder)

    @torch.no_grad()
    def run(self, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback | None = None) -> list[Tensors]:
        # One text-encoder call for all prompts and one for all negative prompts, as the stock
        # pipeline does for one job. In a batch mixing guidance, the negatives of jobs without
        # guidance are computed and dropped: cheaper than a second batch.
        guided = [spec.guidance > 1.0 for spec in specs]
        embeds, mask, negative_embeds, negative_mask = self.pipe.encode_prompt(
            [spec.prompt for spec in specs],
            do_classifier_free_guidance=any(guided),
            negative_prompt=[spec.negative_prompt for spec in specs],
            device=self.device,
            clean_caption=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        outputs = []
        for i, with_guidance in enumerate(guided):
            job = {"prompt_embeds": embeds[i : i + 1], "prompt_attention_mask": mask[i : i + 1]}
            if with_guidance:
                job["negative_prompt_embeds"] = negative_embeds[i : i + 1]
                job["negative_prompt_attention_mask"] = negative_mask[i : i + 1]
            outputs.append(job)
        return outputs


class PixArtDenoiser(PixArtStage):
    stage = "denoise"

    def __init__(self, directory: Path, settings: Settings):
        super().__init__(directory, settings)
        transformer = PixArtTransformer2DModel.from_pretrained(self.directory / "transformer", dtype=self.dtype)
        config = scheduler_config(self.directory)
        scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
        self.pipe = self._partial_pipeline(transformer=transformer.to(self.device).eval(), scheduler=scheduler)

    @torch.no_grad()
    def run(self, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback | None = None) -> list[Tensors]:
        spec = specs[0]
        if any(other.shape_key != spec.shape_key for other in specs):
            raise ValueError("a denoise batch must hold jobs of one shape_key")

        def stacked(name: str) -> torch.Tensor | None:
            return torch.cat([job[name] for job in inputs]).to(self.device) if name in inputs[0] else None

        def report(step_index: int, timestep: object, latents: torch.Tensor) -> None:
            if on_step is not None:
                on_step(step_index + 1, spec.steps)

        latents = self.pipe(
            prompt=None,
            negative_prompt=None,
            prompt_embeds=stacked("prompt_embeds"),
            prompt_attention_mask=stacked("prompt_attention_mask"),
            negative_prompt_embeds=stacked("negative_prompt_embeds"),
            negative_prompt_attention_mask=stacked("negative_prompt_attention_mask"),
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance,
            height=spec.height,
            width=spec.width,
            # One CPU generator per job draws that job's noise exactly as a run of it alone
            # would, on any device (the stock pipeline draws CPU-generated noise on CPU too).
            generator=[torch.Generator().manual_seed(job.seed) for job in specs],
            output_type="latent",
            use_resolution_binning=False,
            clean_caption=False,
            callback=report,
            callback_steps=1,
        ).images
        return [{"latents": latents[i : i + 1]} for i in range(len(specs))]


class PixArtDecoder(PixArtStage):
    stage = "decode"

    def __init__(self, directory: Path, settings: Settings):
        super().__init__(directory, settings)
        vae = AutoencoderKL.from_pretrained(self.directory / "vae", dtype=self.dtype)
        self.vae = vae.to(self.device).eval()
        # Decode the jobs of a batch one by one (diffusers' VAE slicing): batched convolutions
        # round differently (up to 2/255 in bfloat16 on CPU), and one high-resolution image
        # already fills the device while a batch multiplies peak memory.
        self.vae.enable_slicing()
        self.image_processor = PixArtImageProcessor(vae_scale_factor=self.geometry.vae_scale_factor)

    @torch.no_grad()
    def run(self, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback | None = None) -> list[Tensors]:
        latents = torch.cat([job["latents"] for job in inputs]).to(self.device, self.vae.dtype)
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        image = self.image_processor.postprocess(image, output_type="pt")
        # The same float32 arithmetic as VaeImageProcessor.pt_to_numpy + numpy_to_pil.
        pixels = (image.cpu().permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)
        return [{"image": pixels[i]} for i in range(len(specs))]


STAGE_MODELS: dict[str, type[PixArtStage]] = {
    stage.stage: stage for stage in (PixArtEncoder, PixArtDenoiser, PixArtDecoder)
}
