"""FLUX.1 (``FluxPipeline``): a CLIP text encoder (its pooled output only) and a T5 encoder,
the ``FluxTransformer2DModel`` with a flow-matching Euler scheduler on packed latents, and a
16-channel VAE with a shift factor.

Tensors per job: encode -> ``prompt_embeds`` [1, 512, T5 width], ``pooled_prompt_embeds``
[1, CLIP width] and, when guided, the two negatives; denoise -> ``latents`` packed as the
pipeline keeps them, [1, (H/2f)·(W/2f), 4C] (2×2 latent patches side by side); decode -> ``image``.

Guidance: ``JobSpec.guidance`` is true CFG (``true_cfg_scale``, with the negative prompt, two
DiT forwards per step) when above 1; ``JobSpec.embedded_guidance`` is the distilled guidance
fed to a FLUX.1-dev transformer (``guidance_embeds``; FLUX.1-schnell ignores it). The reference
is ``stock_call``, with the pipeline's defaults otherwise (``max_sequence_length`` 512, the
default sigmas); the split stages are bitwise equal to it in float32 and bfloat16.

Batching jobs in one denoise call rounds batched matmuls differently. Measured on flux-tiny with
3 jobs against each alone: float32, latents within 1.8e-6 and pixels within 1/255; bfloat16 equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from pydantic import BaseModel, ConfigDict
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from disagfusion.models.base import StepCallback, Tensors, seeded, write_preset
from disagfusion.models.family import (
    DiffusersFamily, ImageGeometry, add_negatives, denoise_arguments, image_pixels, per_job, scheduler_config,
    stacked, step_reporter,
)
from disagfusion.models.tokenizers import clip_tokenizer, t5_tokenizer
from disagfusion.protocol import JobSpec

MAX_SEQUENCE_LENGTH = 512
"""T5 tokens, the stock pipeline's default (FLUX.1-dev's; schnell was trained with 256)."""


class FluxFamily(DiffusersFamily):
    name = "flux"
    pipeline_class = FluxPipeline.__name__
    prompt_tokenizer = "tokenizer_2"  # T5: the text length; CLIP always truncates at 77
    resumable = True
    stage_components = {
        "encode": ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"),
        "denoise": ("transformer", "scheduler"),
        "decode": ("vae",),
    }
    handoff = {
        "encode": ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"),
        "denoise": ("latents",),
        "decode": ("image",),
    }

    def geometry(self, directory: Path) -> ImageGeometry:
        vae_scale_factor = 2 ** (len(AutoencoderKL.load_config(directory / "vae")["block_out_channels"]) - 1)
        transformer = FluxTransformer2DModel.load_config(directory / "transformer")
        return ImageGeometry(
            family=self.name,
            vae_scale_factor=vae_scale_factor,
            # Latents are packed in 2×2 patches. The stock pipeline only warns on other sizes
            # and makes a smaller image than asked; a job here is rejected instead.
            size_multiple=vae_scale_factor * 2,
            max_steps=scheduler_config(directory)["num_train_timesteps"],
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            guidance="embedded" if transformer.get("guidance_embeds") else "cfg",
        )

    def stock_call(self, pipe: FluxPipeline, spec: JobSpec, output_type: str = "pil") -> Any:
        return pipe(
            spec.prompt,
            negative_prompt=spec.negative_prompt if spec.guided else None,  # None: true CFG off
            true_cfg_scale=spec.guidance,
            guidance_scale=spec.embedded_guidance,
            num_inference_steps=spec.steps,
            height=spec.height,
            width=spec.width,
            generator=torch.Generator().manual_seed(spec.seed),
            output_type=output_type,
        )

    def encode(self, pipe: FluxPipeline, specs: list[JobSpec]) -> list[Tensors]:
        # The stock pipeline encodes prompts and negative prompts in two calls; so does this,
        # with the negatives of the guided jobs only.
        def encoded(prompts: list[str], prefix: str = "") -> list[Tensors]:
            embeds, pooled, _ = pipe.encode_prompt(prompts, device=pipe.device, max_sequence_length=MAX_SEQUENCE_LENGTH)
            return per_job({f"{prefix}prompt_embeds": embeds, f"{prefix}pooled_prompt_embeds": pooled}, len(prompts))

        jobs = encoded([spec.prompt for spec in specs])
        return add_negatives(specs, jobs, lambda negatives: encoded(negatives, prefix="negative_"))

    def denoise(self, pipe: FluxPipeline, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback) -> list[Tensors]:
        spec = specs[0]
        # The jobs of a batch share guidance (it is in shape_key): all carry negatives, or none.
        # Without negatives true CFG is off whatever true_cfg_scale says.
        latents = pipe(
            **denoise_arguments(specs),
            prompt=None,
            prompt_embeds=stacked(inputs, "prompt_embeds", pipe.device),
            pooled_prompt_embeds=stacked(inputs, "pooled_prompt_embeds", pipe.device),
            negative_prompt_embeds=stacked(inputs, "negative_prompt_embeds", pipe.device),
            negative_pooled_prompt_embeds=stacked(inputs, "negative_pooled_prompt_embeds", pipe.device),
            true_cfg_scale=spec.guidance,
            guidance_scale=spec.embedded_guidance,
            callback_on_step_end=step_reporter(on_step, spec.steps),
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        ).images
        return per_job({"latents": latents}, len(specs))

    def decode(self, pipe: FluxPipeline, specs: list[JobSpec], inputs: list[Tensors]) -> list[Tensors]:
        spec = specs[0]
        latents = stacked(inputs, "latents", pipe.device).to(pipe.vae.dtype)
        # The stock pipeline's arithmetic, in its order: unpack the 2×2 patches, then denormalise.
        latents = pipe._unpack_latents(latents, spec.height, spec.width, pipe.vae_scale_factor)
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        return image_pixels(image, pipe.image_processor)


FAMILY = FluxFamily()


# ------------------------------------------------------------------ presets


class Preset(BaseModel):
    model_config = ConfigDict(frozen=True)

    seed: int
    clip_dim: int
    clip_layers: int
    t5_dim: int
    t5_layers: int
    dit_layers: int
    """Double-stream (MMDiT) blocks."""
    dit_single_layers: int
    dit_heads: int
    dit_head_dim: int
    rope_axes: tuple[int, int, int]
    """Rotary dimensions per position axis (text index, row, column); they add up to the head dim."""
    vae_channels: tuple[int, ...]
    vae_groups: int


PRESETS: dict[str, Preset] = {
    "flux-tiny": Preset(
        seed=40, clip_dim=16, clip_layers=1, t5_dim=32, t5_layers=1,
        dit_layers=1, dit_single_layers=1, dit_heads=2, dit_head_dim=16, rope_axes=(4, 6, 6),
        vae_channels=(8, 8, 16, 16), vae_groups=4,  # scales by 8, as FLUX.1's VAE
    ),
}

LATENT_CHANNELS = 16
# FLUX.1-dev's VAE normalisation and scheduler (black-forest-labs/FLUX.1-dev).
FLUX_VAE = dict(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
    base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)


def build_pipeline(preset: Preset) -> FluxPipeline:
    """The preset's pipeline in memory, every component initialised from its own seed."""
    tokenizer = clip_tokenizer()
    tokenizer_2 = t5_tokenizer()
    with seeded(preset.seed):
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=preset.clip_dim, intermediate_size=preset.clip_dim * 2,
                num_hidden_layers=preset.clip_layers, num_attention_heads=2,
                max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
        )
    with seeded(preset.seed + 1):
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2), d_model=preset.t5_dim, d_kv=preset.t5_dim // 2, d_ff=preset.t5_dim * 2,
                num_layers=preset.t5_layers, num_heads=2, feed_forward_proj="gated-gelu",
                is_encoder_decoder=False, use_cache=False,
            )
        )
    with seeded(preset.seed + 2):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=LATENT_CHANNELS * 4,  # packed 2×2 patches
            num_layers=preset.dit_layers,
            num_single_layers=preset.dit_single_layers,
            attention_head_dim=preset.dit_head_dim,
            num_attention_heads=preset.dit_heads,
            joint_attention_dim=preset.t5_dim,
            pooled_projection_dim=preset.clip_dim,
            guidance_embeds=True,  # as FLUX.1-dev
            axes_dims_rope=preset.rope_axes,
        )
    with seeded(preset.seed + 3):
        blocks = len(preset.vae_channels)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=preset.vae_channels,
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=preset.vae_groups,
            **FLUX_VAE,
        )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


def init_model(preset: str, directory: Path) -> Path:
    """Write preset ``preset`` to ``directory`` unless something is there already; return it."""
    return write_preset(PRESETS, preset, directory, build_pipeline)
