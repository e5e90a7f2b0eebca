"""SANA (``SanaPipeline``): a Gemma 2 text encoder, the linear-attention ``SanaTransformer2DModel``
with a flow-matching DPM-Solver, and the deep-compression ``AutoencoderDC`` (32× in real SANA).

Tensors per job: encode -> ``prompt_embeds`` [1, 300, Gemma width], ``prompt_attention_mask``
[1, 300] and, when guided, the two negatives; denoise -> ``latents`` [1, C, H/f, W/f]; decode
-> ``image``.

The reference is ``stock_call``. Two of its defaults must be matched by the split stages:
- the stock ``__call__`` prepends a long "complex human instruction" to every prompt (not to the
  negative) while ``encode_prompt`` defaults to none: the encoder passes the very list the stock
  call defaults to, read from its signature (``COMPLEX_HUMAN_INSTRUCTION``);
- resolution binning is on by default and would silently run another size: off in both.
Without a VAE the pipeline assumes a scale factor of 32; the dit stage sets the real one from
the VAE config (``DiffusersFamily.load_pipeline``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
from pydantic import BaseModel, ConfigDict
from transformers import Gemma2Config, Gemma2Model

from disagfusion.models.base import StepCallback, Tensors, seeded, write_preset
from disagfusion.models.family import (
    DiffusersFamily, ImageGeometry, denoise_arguments, image_pixels, per_job, scheduler_config, stacked,
    step_reporter, with_negatives,
)
from disagfusion.models.tokenizers import gemma_tokenizer
from disagfusion.protocol import JobSpec

MAX_SEQUENCE_LENGTH = 300
"""Gemma tokens kept per prompt (after the instruction), the stock pipeline's default."""

COMPLEX_HUMAN_INSTRUCTION: list[str] = inspect.signature(SanaPipeline.__call__).parameters[
    "complex_human_instruction"
].default
"""What the stock call prepends to each prompt unless told otherwise."""

# The stock pipeline rejects other sizes, whatever the VAE.
PIPELINE_SIZE_MULTIPLE = 32


class SanaFamily(DiffusersFamily):
    name = "sana"
    pipeline_class = SanaPipeline.__name__
    resumable = True
    stage_components = {"encode": ("tokenizer", "text_encoder"), "denoise": ("transformer", "scheduler"), "decode": ("vae",)}
    handoff = {
        "encode": ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask"),
        "denoise": ("latents",),
        "decode": ("image",),
    }

    def geometry(self, directory: Path) -> ImageGeometry:
        vae = AutoencoderDC.load_config(directory / "vae")
        vae_scale_factor = 2 ** (len(vae["encoder_block_out_channels"]) - 1)
        patch_size = SanaTransformer2DModel.load_config(directory / "transformer")["patch_size"]
        return ImageGeometry(
            family=self.name,
            vae_scale_factor=vae_scale_factor,
            size_multiple=max(PIPELINE_SIZE_MULTIPLE, vae_scale_factor * patch_size),
            max_steps=scheduler_config(directory)["num_train_timesteps"],
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )

    def stock_call(self, pipe: SanaPipeline, spec: JobSpec, output_type: str = "pil") -> Any:
        return pipe(
            spec.prompt,
            negative_prompt=spec.negative_prompt,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance,
            height=spec.height,
            width=spec.width,
            generator=torch.Generator().manual_seed(spec.seed),
            use_resolution_binning=False,  # else small sizes silently run at another size
            output_type=output_type,
        )

    def encode(self, pipe: SanaPipeline, specs: list[JobSpec]) -> list[Tensors]:
        embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
            [spec.prompt for spec in specs],
            do_classifier_free_guidance=any(spec.guided for spec in specs),
            negative_prompt=[spec.negative_prompt for spec in specs],
            device=pipe.device,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            complex_human_instruction=COMPLEX_HUMAN_INSTRUCTION,
        )
        return with_negatives(
            specs, {"prompt_embeds": embeds, "prompt_attention_mask": mask},
            {"negative_prompt_embeds": negative_embeds, "negative_prompt_attention_mask": negative_mask},
        )

    def denoise(self, pipe: SanaPipeline, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback) -> list[Tensors]:
        spec = specs[0]
        latents = pipe(
            **denoise_arguments(specs),
            prompt=None,
            negative_prompt=None,  # the embeds below stand for it
            prompt_embeds=stacked(inputs, "prompt_embeds", pipe.device),
            prompt_attention_mask=stacked(inputs, "prompt_attention_mask", pipe.device),
            negative_prompt_embeds=stacked(inputs, "negative_prompt_embeds", pipe.device),
            negative_prompt_attention_mask=stacked(inputs, "negative_prompt_attention_mask", pipe.device),
            guidance_scale=spec.guidance,
            use_resolution_binning=False,
            callback_on_step_end=step_reporter(on_step, spec.steps),
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        ).images
        return per_job({"latents": latents}, len(specs))

    def decode(self, pipe: SanaPipeline, specs: list[JobSpec], inputs: list[Tensors]) -> list[Tensors]:
        latents = stacked(inputs, "latents", pipe.device).to(pipe.vae.dtype)
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return image_pixels(image, pipe.image_processor)


FAMILY = SanaFamily()


# ------------------------------------------------------------------ presets


class Preset(BaseModel):
    model_config = ConfigDict(frozen=True)

    seed: int
    text_dim: int
    text_layers: int
    dit_layers: int
    dit_heads: int
    dit_head_dim: int
    vae_channels: tuple[int, ...]
    """One DC-AE block per entry; it scales by 2 ** (len - 1)."""
    latent_channels: int


PRESETS: dict[str, Preset] = {
    "sana-tiny": Preset(
        seed=50, text_dim=32, text_layers=2, dit_layers=2, dit_heads=2, dit_head_dim=8,
        vae_channels=(8, 16, 16), latent_channels=8,
    ),
}

# SANA's scheduler (Efficient-Large-Model/Sana_1600M_1024px_diffusers): DPM-Solver++ on flow sigmas.
SANA_SCHEDULER = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    final_sigmas_type="zero",
    timestep_spacing="linspace",
)
SANA_VAE_SCALING_FACTOR = 0.41407  # DC-AE f32c32's


def build_pipeline(preset: Preset) -> SanaPipeline:
    """The preset's pipeline in memory, every component initialised from its own seed."""
    tokenizer = gemma_tokenizer()
    with seeded(preset.seed):
        text_encoder = Gemma2Model(
            Gemma2Config(
                vocab_size=len(tokenizer), hidden_size=preset.text_dim, intermediate_size=preset.text_dim * 2,
                num_hidden_layers=preset.text_layers, num_attention_heads=2, num_key_value_heads=1,
                head_dim=preset.text_dim // 2, query_pre_attn_scalar=preset.text_dim // 2,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
    with seeded(preset.seed + 1):
        width = preset.dit_heads * preset.dit_head_dim
        transformer = SanaTransformer2DModel(
            in_channels=preset.latent_channels, out_channels=preset.latent_channels,
            num_attention_heads=preset.dit_heads, attention_head_dim=preset.dit_head_dim, num_layers=preset.dit_layers,
            num_cross_attention_heads=preset.dit_heads, cross_attention_head_dim=preset.dit_head_dim,
            cross_attention_dim=width, caption_channels=preset.text_dim, sample_size=32, patch_size=1,
        )
    with seeded(preset.seed + 2):
        blocks = len(preset.vae_channels)
        vae = AutoencoderDC(
            latent_channels=preset.latent_channels, attention_head_dim=8,
            encoder_block_types="ResBlock", decoder_block_types="ResBlock",
            encoder_block_out_channels=preset.vae_channels, decoder_block_out_channels=preset.vae_channels,
            encoder_layers_per_block=(1,) * blocks, decoder_layers_per_block=(1,) * blocks,
            encoder_qkv_multiscales=((),) * blocks, decoder_qkv_multiscales=((),) * blocks,
            scaling_factor=SANA_VAE_SCALING_FACTOR,
        )
    return SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**SANA_SCHEDULER),
    )


def init_model(preset: str, directory: Path) -> Path:
    """Write preset ``preset`` to ``directory`` unless something is there already; return it."""
    return write_preset(PRESETS, preset, directory, build_pipeline)
