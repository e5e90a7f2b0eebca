"""PixArt-Sigma (``PixArtSigmaPipeline``): T5 encoder, PixArt DiT with a DPM-Solver scheduler,
SDXL-style VAE.

Tensors per job: encode -> ``prompt_embeds``, ``prompt_attention_mask`` and, when guided,
``negative_prompt_embeds``, ``negative_prompt_attention_mask``; denoise -> ``latents``
[1, 4, H/f, W/f]; decode -> ``image``. The encoder may carry Engram layers (DF_ENGRAM_ARENA).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, PixArtSigmaPipeline, PixArtTransformer2DModel
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import PixArtImageProcessor

from disagfusion.config import Settings
from disagfusion.engram.module import attach_engram
from disagfusion.models.base import StepCallback, Tensors
from disagfusion.models.family import (
    DiffusersFamily, ImageGeometry, denoise_arguments, image_pixels, per_job, scheduler_config, stacked,
    with_negatives,
)
from disagfusion.protocol import JobSpec

MAX_SEQUENCE_LENGTH = 300
"""PixArt-Sigma's prompt length in tokens; prompts are padded (or truncated) to it."""

# The stock pipeline itself rejects sizes that are not multiples of 8, whatever the VAE.
PIPELINE_SIZE_MULTIPLE = 8


class PixArtFamily(DiffusersFamily):
    name = "pixart"
    pipeline_class = PixArtSigmaPipeline.__name__
    resumable = True
    stage_components = {"encode": ("tokenizer", "text_encoder"), "denoise": ("transformer", "scheduler"), "decode": ("vae",)}
    handoff = {
        "encode": ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask"),
        "denoise": ("latents",),
        "decode": ("image",),
    }

    def geometry(self, directory: Path) -> ImageGeometry:
        vae_scale_factor = 2 ** (len(AutoencoderKL.load_config(directory / "vae")["block_out_channels"]) - 1)
        patch_size = PixArtTransformer2DModel.load_config(directory / "transformer")["patch_size"]
        return ImageGeometry(
            family=self.name,
            vae_scale_factor=vae_scale_factor,
            size_multiple=math.lcm(vae_scale_factor * patch_size, PIPELINE_SIZE_MULTIPLE),
            max_steps=scheduler_config(directory)["num_train_timesteps"],
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )

    def stock_call(self, pipe: PixArtSigmaPipeline, spec: JobSpec, output_type: str = "pil") -> Any:
        return pipe(
            spec.prompt,
            negative_prompt=spec.negative_prompt,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance,
            height=spec.height,
            width=spec.width,
            generator=torch.Generator().manual_seed(spec.seed),
            use_resolution_binning=False,  # else small sizes silently run at another size
            clean_caption=False,
            output_type=output_type,
        )

    def prepare(self, stage: str, pipe: Any, directory: Path, settings: Settings) -> None:
        if stage == "encode":
            # With DF_ENGRAM_ARENA set, Engram layers join the text encoder; their rows are
            # prefetched the moment the tokenized prompt reaches it (a forward pre-hook).
            pipe.engram = attach_engram(pipe.text_encoder, settings, directory / "text_encoder", pipe.tokenizer)
        if stage == "decode":
            pipe.image_processor = PixArtImageProcessor(vae_scale_factor=pipe.vae_scale_factor)

    def encode(self, pipe: PixArtSigmaPipeline, specs: list[JobSpec]) -> list[Tensors]:
        embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
            [spec.prompt for spec in specs],
            do_classifier_free_guidance=any(spec.guided for spec in specs),
            negative_prompt=[spec.negative_prompt for spec in specs],
            device=pipe.device,
            clean_caption=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return with_negatives(
            specs, {"prompt_embeds": embeds, "prompt_attention_mask": mask},
            {"negative_prompt_embeds": negative_embeds, "negative_prompt_attention_mask": negative_mask},
        )

    def denoise(self, pipe: PixArtSigmaPipeline, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback) -> list[Tensors]:
        spec = specs[0]
        latents = pipe(
            **denoise_arguments(specs),
            prompt=None,
            negative_prompt=None,
            prompt_embeds=stacked(inputs, "prompt_embeds", pipe.device),
            prompt_attention_mask=stacked(inputs, "prompt_attention_mask", pipe.device),
            negative_prompt_embeds=stacked(inputs, "negative_prompt_embeds", pipe.device),
            negative_prompt_attention_mask=stacked(inputs, "negative_prompt_attention_mask", pipe.device),
            guidance_scale=spec.guidance,
            use_resolution_binning=False,
            clean_caption=False,
            callback=lambda step_index, timestep, latents: on_step(step_index + 1, spec.steps),
            callback_steps=1,
        ).images
        return per_job({"latents": latents}, len(specs))

    def decode(self, pipe: PixArtSigmaPipeline, specs: list[JobSpec], inputs: list[Tensors]) -> list[Tensors]:
        latents = stacked(inputs, "latents", pipe.device).to(pipe.vae.dtype)
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return image_pixels(image, pipe.image_processor)


FAMILY = PixArtFamily()
