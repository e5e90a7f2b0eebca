"""Wan 2.1 text-to-video (``WanPipeline``): a UMT5 text encoder, the ``WanTransformer3DModel``
(self-attention over video patches, cross-attention to the text) with Wan's UniPC multistep
scheduler in flow-matching mode, and the causal 3D ``AutoencoderKLWan`` (8× in space, 4× in time).

Tensors per job: encode -> ``prompt_embeds`` [1, 512, UMT5 width] (each prompt's own tokens, then
zeros) and, when guided, ``negative_prompt_embeds``; denoise -> ``latents`` as the pipeline keeps
them, channels first: [1, C, (frames - 1) / 4 + 1, H/8, W/8], still normalised; decode ->
``video`` uint8 [frames, H, W, 3] and ``image`` (its first frame).

The reference is ``stock_call``; the split stages are bitwise equal to it in float32 and bfloat16. What they
must match in it:
- decode is the pipeline's arithmetic exactly, ``latents / (1 / std) + mean`` (not
  ``latents * std + mean``), then its ``VideoProcessor``.
- built without a VAE, the pipeline assumes 8× / 4× scale factors: the denoise stage sets them
  from the VAE config (``prepare``).
- prompts are cleaned with ``ftfy`` only when it is installed; the encoder runs the pipeline's
  own ``encode_prompt``, so it cleans exactly as the stock call does either way.
- ``WanTransformer3DModel`` keeps some modules in float32 (``_keep_in_fp32_modules``), which
  ``from_pretrained`` can only load with ``accelerate`` installed.

``JobSpec.guidance`` is the pipeline's ``guidance_scale`` (classifier-free guidance with the
negative prompt above 1; two DiT forwards per step). ``embedded_guidance`` is not used. A Wan 2.2
two-expert model (``transformer_2``, ``boundary_ratio``) is not covered.

Batching jobs in one denoise call rounds batched matmuls differently. Measured on wan-tiny with 2
jobs against each alone (float32, one thread): guided, latents within 2.9e-6; unguided, within
4.8e-7; frames equal in both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from pydantic import BaseModel, ConfigDict
from transformers import UMT5Config, UMT5EncoderModel

from disagfusion.config import Settings
from disagfusion.models.base import StepCallback, Tensors, seeded, write_preset
from disagfusion.models.family import (
    DiffusersFamily, VideoGeometry, denoise_arguments, per_job, scheduler_config, stacked, step_reporter,
    video_pixels, with_negatives,
)
from disagfusion.models.tokenizers import t5_tokenizer
from disagfusion.protocol import JobSpec

MAX_SEQUENCE_LENGTH = 512
"""UMT5 tokens per prompt: the stock ``__call__``'s default (``encode_prompt`` alone defaults to 226)."""


class WanFamily(DiffusersFamily):
    name = "wan"
    pipeline_class = WanPipeline.__name__
    stage_components = {"encode": ("tokenizer", "text_encoder"), "denoise": ("transformer", "scheduler"), "decode": ("vae",)}
    handoff = {
        "encode": ("prompt_embeds", "negative_prompt_embeds"),
        "denoise": ("latents",),
        "decode": ("video", "image"),
    }

    def geometry(self, directory: Path) -> VideoGeometry:
        vae = AutoencoderKLWan.load_config(directory / "vae")
        transformer = WanTransformer3DModel.load_config(directory / "transformer")
        spatial = int(vae["scale_factor_spatial"])
        _, patch_h, patch_w = transformer["patch_size"]
        return VideoGeometry(
            family=self.name,
            vae_scale_factor=spatial,
            # The stock pipeline rounds other sizes down (with a warning); a job is rejected instead.
            size_multiple=spatial * max(patch_h, patch_w),
            max_steps=scheduler_config(directory)["num_train_timesteps"],
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            temporal_factor=int(vae["scale_factor_temporal"]),
        )

    def prepare(self, stage: str, pipe: WanPipeline, directory: Path, settings: Settings) -> None:
        geometry = self.geometry(directory)
        # Without a VAE the pipeline assumes 8× and 4×; use the real factors.
        pipe.vae_scale_factor_spatial = geometry.vae_scale_factor
        pipe.vae_scale_factor_temporal = geometry.temporal_factor

    def stock_call(self, pipe: WanPipeline, spec: JobSpec, output_type: str = "pil") -> Any:
        return pipe(
            spec.prompt,
            negative_prompt=spec.negative_prompt,
            guidance_scale=spec.guidance,
            num_frames=spec.frames,
            num_inference_steps=spec.steps,
            height=spec.height,
            width=spec.width,
            generator=torch.Generator().manual_seed(spec.seed),
            output_type=output_type,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )

    def encode(self, pipe: WanPipeline, specs: list[JobSpec]) -> list[Tensors]:
        embeds, negative_embeds = pipe.encode_prompt(
            [spec.prompt for spec in specs],
            negative_prompt=[spec.negative_prompt for spec in specs],
            do_classifier_free_guidance=any(spec.guided for spec in specs),
            device=pipe.device,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return with_negatives(specs, {"prompt_embeds": embeds}, {"negative_prompt_embeds": negative_embeds})

    def denoise(self, pipe: WanPipeline, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback) -> list[Tensors]:
        spec = specs[0]
        latents = pipe(
            **denoise_arguments(specs),
            prompt=None,
            negative_prompt=None,  # the embeds below stand for it
            prompt_embeds=stacked(inputs, "prompt_embeds", pipe.device),
            negative_prompt_embeds=stacked(inputs, "negative_prompt_embeds", pipe.device),
            guidance_scale=spec.guidance,
            num_frames=spec.frames,
            callback_on_step_end=step_reporter(on_step, spec.steps),
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        ).frames
        return per_job({"latents": latents}, len(specs))

    def decode(self, pipe: WanPipeline, specs: list[JobSpec], inputs: list[Tensors]) -> list[Tensors]:
        vae = pipe.vae
        latents = stacked(inputs, "latents", pipe.device).to(vae.dtype)
        # The stock pipeline's arithmetic, in its order: divide by 1/std, then add the mean.
        shape = (1, vae.config.z_dim, 1, 1, 1)
        latents_mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        latents = latents / latents_std + latents_mean
        video = vae.decode(latents, return_dict=False)[0]
        return video_pixels(pipe.video_processor.postprocess_video(video, output_type="pt"))


FAMILY = WanFamily()


# ------------------------------------------------------------------ presets


class Preset(BaseModel):
    model_config = ConfigDict(frozen=True)

    seed: int
    umt5_dim: int
    umt5_layers: int
    dit_layers: int
    dit_heads: int
    dit_head_dim: int
    dit_ffn_dim: int
    vae_base_dim: int
    vae_dim_mult: tuple[int, ...]


PRESETS: dict[str, Preset] = {
    "wan-tiny": Preset(
        seed=80, umt5_dim=32, umt5_layers=1, dit_layers=1, dit_heads=2, dit_head_dim=12, dit_ffn_dim=32,
        vae_base_dim=8, vae_dim_mult=(1, 1, 1, 1),  # 8× in space, 4× in time, as Wan 2.1's VAE
    ),
}

LATENT_CHANNELS = 16
# Wan 2.1 T2V's scheduler (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, scheduler_config.json): UniPC in
# flow-matching mode, shift 3 (480p).
WAN_SCHEDULER = dict(
    num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
    solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
    timestep_spacing="linspace", beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
)


def build_pipeline(preset: Preset) -> WanPipeline:
    """The preset's pipeline in memory, every component initialised from its own seed."""
    tokenizer = t5_tokenizer()  # UMT5 uses T5's tokenizer class
    with seeded(preset.seed):
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer), d_model=preset.umt5_dim, d_kv=preset.umt5_dim // 2,
                d_ff=preset.umt5_dim * 2, num_layers=preset.umt5_layers, num_heads=2,
                feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
            )
        )
    with seeded(preset.seed + 1):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=preset.dit_heads, attention_head_dim=preset.dit_head_dim,
            in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=preset.umt5_dim, freq_dim=256,
            ffn_dim=preset.dit_ffn_dim, num_layers=preset.dit_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        )
    with seeded(preset.seed + 2):
        vae = AutoencoderKLWan(
            base_dim=preset.vae_base_dim, z_dim=LATENT_CHANNELS, dim_mult=list(preset.vae_dim_mult),
            num_res_blocks=1, temperal_downsample=[False, True, True],
        )
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER),
    )


def init_model(preset: str, directory: Path) -> Path:
    """Write preset ``preset`` to ``directory`` unless something is there already; return it."""
    return write_preset(PRESETS, preset, directory, build_pipeline)
