"""HunyuanVideo (``HunyuanVideoPipeline``): a Llama 3 text encoder (a hidden state from near its
top, read through a prompt template) and a CLIP text encoder (its pooled output only), the
guidance-distilled ``HunyuanVideoTransformer3DModel`` with a flow-matching Euler scheduler, and
the causal 3D ``AutoencoderKLHunyuanVideo`` (8× in space, 4× in time, as the real one).

Tensors per job: encode -> ``prompt_embeds`` [1, 256, Llama width], ``pooled_prompt_embeds``
[1, CLIP width], ``prompt_attention_mask`` [1, 256] and, when guided, the three negatives;
denoise -> ``latents`` [1, C, (frames - 1) / 4 + 1, H/f, W/f]; decode -> ``video`` uint8
[frames, H, W, 3] and ``image`` (its first frame).

Guidance: ``JobSpec.embedded_guidance`` is the pipeline's ``guidance_scale``, the distilled
guidance fed to the transformer; ``JobSpec.guidance`` is ``true_cfg_scale``: above 1, true CFG
with the negative prompt (two DiT forwards per step), as in FLUX.1. The reference is ``stock_call``;
the split stages are bitwise equal to it in float32 and bfloat16 (also from an fp16 sharded
checkpoint).

The prompt template: the pipeline wraps each prompt in a Llama 3 chat template (a system prompt
describing what to say about a video) and then drops the template's first ``crop_start`` tokens
from the embeds and the mask. Its default template says ``crop_start: 95``, the count for the
real Llama 3 vocabulary; with another tokenizer (the preset's) that count cuts into the prompt or
leaves template tokens in (214 here), and ``crop_start=None`` makes the pipeline count the
template padded to the tokenizer's ``model_max_length`` (131072 here), so every prompt is padded
to that many tokens more and what the crop leaves is padding. So ``prompt_template`` recounts it for
the tokenizer at hand (the tokens of the template before the prompt, ``<|begin_of_text|>``
included), and both the stock reference call (``stock_call``) and the encoder pass that template
explicitly: the stock call with the pipeline's default template would not be the same model.

Frames: the pipeline makes ``(num_frames - 1) // 4 + 1`` latent frames and the VAE decodes k + 1
latent frames to 4k + 1 frames (measured: 1, 5, 9, 13, 17 come back as asked): ``VideoGeometry``
with the VAE config's ``temporal_compression_ratio``. Height and width: multiples of 16 (the
pipeline checks) and of the VAE factor × the DiT's patch. Built without a VAE the pipeline
assumes 8× / 4×: the denoise stage sets the factors from the VAE config (``prepare``).

Batching jobs in one denoise call rounds batched matmuls differently. Measured on
hunyuan-video-tiny with 2 jobs against each alone (float32): latents within 1.9e-6 (true CFG) and
6e-7 (without), frames within 1/255.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from pydantic import BaseModel, ConfigDict
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

from disagfusion.config import Settings
from disagfusion.models.base import StepCallback, Tensors, seeded, write_preset
from disagfusion.models.family import (
    DiffusersFamily, VideoGeometry, add_negatives, denoise_arguments, per_job, scheduler_config, stacked,
    step_reporter, video_pixels,
)
from disagfusion.models.tokenizers import clip_tokenizer, llama_tokenizer
from disagfusion.protocol import JobSpec

MAX_SEQUENCE_LENGTH = 256
"""Llama tokens kept per prompt after the template, the stock pipeline's default."""

# The stock pipeline rejects other sizes, whatever the VAE.
PIPELINE_SIZE_MULTIPLE = 16


def prompt_template(tokenizer: Any) -> dict[str, Any]:
    """The pipeline's default template with ``crop_start`` counted for ``tokenizer``: the
    tokens the template puts before the prompt (95 for the real Llama 3 tokenizer)."""
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    before_prompt = template[: template.index("{}")]
    return {"template": template, "crop_start": len(tokenizer(before_prompt).input_ids)}


class HunyuanVideoFamily(DiffusersFamily):
    name = "hunyuan-video"
    pipeline_class = HunyuanVideoPipeline.__name__
    stage_components = {
        "encode": ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"),
        "denoise": ("transformer", "scheduler"),
        "decode": ("vae",),
    }
    handoff = {
        "encode": (
            "prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask",
            "negative_prompt_embeds", "negative_pooled_prompt_embeds", "negative_prompt_attention_mask",
        ),
        "denoise": ("latents",),
        "decode": ("video", "image"),
    }

    def geometry(self, directory: Path) -> VideoGeometry:
        vae = AutoencoderKLHunyuanVideo.load_config(directory / "vae")
        transformer = HunyuanVideoTransformer3DModel.load_config(directory / "transformer")
        return VideoGeometry(
            family=self.name,
            vae_scale_factor=vae["spatial_compression_ratio"],
            size_multiple=max(PIPELINE_SIZE_MULTIPLE, vae["spatial_compression_ratio"] * transformer["patch_size"]),
            max_steps=scheduler_config(directory)["num_train_timesteps"],
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            guidance="embedded" if transformer.get("guidance_embeds", True) else "cfg",
            temporal_factor=vae["temporal_compression_ratio"],
        )

    def prepare(self, stage: str, pipe: HunyuanVideoPipeline, directory: Path, settings: Settings) -> None:
        geometry = self.geometry(directory)
        # Without a VAE the pipeline assumes 8× and 4×; use the real factors.
        pipe.vae_scale_factor_spatial = geometry.vae_scale_factor
        pipe.vae_scale_factor_temporal = geometry.temporal_factor

    def stock_call(self, pipe: HunyuanVideoPipeline, spec: JobSpec, output_type: str = "pil") -> Any:
        return pipe(
            spec.prompt,
            negative_prompt=spec.negative_prompt if spec.guided else None,  # None: true CFG off
            true_cfg_scale=spec.guidance,
            guidance_scale=spec.embedded_guidance,
            num_frames=spec.frames,
            num_inference_steps=spec.steps,
            height=spec.height,
            width=spec.width,
            generator=torch.Generator().manual_seed(spec.seed),
            output_type=output_type,
            prompt_template=prompt_template(pipe.tokenizer),  # crop_start counted for this tokenizer
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )

    def _encode(self, pipe: HunyuanVideoPipeline, prompts: list[str], prefix: str = "") -> list[Tensors]:
        embeds, pooled, mask = pipe.encode_prompt(
            prompts, prompt_template=prompt_template(pipe.tokenizer), device=pipe.device,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return per_job(
            {f"{prefix}prompt_embeds": embeds, f"{prefix}pooled_prompt_embeds": pooled, f"{prefix}prompt_attention_mask": mask},
            len(prompts),
        )

    def encode(self, pipe: HunyuanVideoPipeline, specs: list[JobSpec]) -> list[Tensors]:
        # The stock pipeline encodes prompts and negative prompts in two calls; so does this,
        # with the negatives of the guided jobs only.
        jobs = self._encode(pipe, [spec.prompt for spec in specs])
        return add_negatives(specs, jobs, lambda negatives: self._encode(pipe, negatives, prefix="negative_"))

    def denoise(self, pipe: HunyuanVideoPipeline, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback) -> list[Tensors]:
        spec = specs[0]
        # The jobs of a batch share guidance (it is in shape_key): all carry negatives, or none.
        # Without negatives true CFG is off whatever true_cfg_scale says.
        latents = pipe(
            **denoise_arguments(specs),
            prompt=None,
            prompt_embeds=stacked(inputs, "prompt_embeds", pipe.device),
            pooled_prompt_embeds=stacked(inputs, "pooled_prompt_embeds", pipe.device),
            prompt_attention_mask=stacked(inputs, "prompt_attention_mask", pipe.device),
            negative_prompt_embeds=stacked(inputs, "negative_prompt_embeds", pipe.device),
            negative_pooled_prompt_embeds=stacked(inputs, "negative_pooled_prompt_embeds", pipe.device),
            negative_prompt_attention_mask=stacked(inputs, "negative_prompt_attention_mask", pipe.device),
            true_cfg_scale=spec.guidance,
            guidance_scale=spec.embedded_guidance,
            num_frames=spec.frames,
            callback_on_step_end=step_reporter(on_step, spec.steps),
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        ).frames
        return per_job({"latents": latents}, len(specs))

    def decode(self, pipe: HunyuanVideoPipeline, specs: list[JobSpec], inputs: list[Tensors]) -> list[Tensors]:
        latents = stacked(inputs, "latents", pipe.device)
        # The stock pipeline's arithmetic, in its order.
        latents = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
        video = pipe.vae.decode(latents, return_dict=False)[0]
        return video_pixels(pipe.video_processor.postprocess_video(video, output_type="pt"))


FAMILY = HunyuanVideoFamily()


# ------------------------------------------------------------------ presets


class Preset(BaseModel):
    model_config = ConfigDict(frozen=True)

    seed: int
    llama_dim: int
    llama_layers: int
    """At least 3: the pipeline reads the hidden state 2 layers below the top."""
    clip_dim: int
    clip_layers: int
    dit_layers: int
    """Dual-stream blocks."""
    dit_single_layers: int
    dit_refiner_layers: int
    """Blocks of the token refiner the text embeds pass through first."""
    dit_heads: int
    dit_head_dim: int
    rope_axes: tuple[int, int, int]
    """Rotary dimensions per position axis (frame, row, column); they add up to the head dim."""
    vae_channels: tuple[int, ...]
    vae_groups: int


PRESETS: dict[str, Preset] = {
    "hunyuan-video-tiny": Preset(
        seed=80, llama_dim=32, llama_layers=3, clip_dim=16, clip_layers=1,
        dit_layers=1, dit_single_layers=1, dit_refiner_layers=1, dit_heads=2, dit_head_dim=16, rope_axes=(4, 6, 6),
        vae_channels=(8, 8, 16, 16), vae_groups=4,  # 8× in space, 4× in time, as HunyuanVideo's VAE
    ),
}

LATENT_CHANNELS = 16
# HunyuanVideo's scheduler and VAE normalisation (hunyuanvideo-community/HunyuanVideo).
HUNYUAN_SCHEDULER = dict(num_train_timesteps=1000, shift=7.0)
HUNYUAN_VAE_SCALING_FACTOR = 0.476986


def build_pipeline(preset: Preset) -> HunyuanVideoPipeline:
    """The preset's pipeline in memory, every component initialised from its own seed."""
    tokenizer = llama_tokenizer()
    tokenizer_2 = clip_tokenizer()
    with seeded(preset.seed):
        text_encoder = LlamaModel(
            LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=preset.llama_dim, intermediate_size=preset.llama_dim * 2,
                num_hidden_layers=preset.llama_layers, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=8192, rope_theta=500000.0,  # Llama 3's
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
    with seeded(preset.seed + 1):
        text_encoder_2 = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer_2), hidden_size=preset.clip_dim, intermediate_size=preset.clip_dim * 2,
                num_hidden_layers=preset.clip_layers, num_attention_heads=2,
                max_position_embeddings=tokenizer_2.model_max_length, bos_token_id=tokenizer_2.bos_token_id,
                eos_token_id=tokenizer_2.eos_token_id, pad_token_id=tokenizer_2.pad_token_id,
            )
        )
    with seeded(preset.seed + 2):
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            num_attention_heads=preset.dit_heads, attention_head_dim=preset.dit_head_dim,
            num_layers=preset.dit_layers, num_single_layers=preset.dit_single_layers,
            num_refiner_layers=preset.dit_refiner_layers, patch_size=2, patch_size_t=1,
            guidance_embeds=True,  # guidance-distilled, as HunyuanVideo
            text_embed_dim=preset.llama_dim, pooled_projection_dim=preset.clip_dim, rope_axes_dim=preset.rope_axes,
        )
    with seeded(preset.seed + 3):
        blocks = len(preset.vae_channels)
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=LATENT_CHANNELS,
            down_block_types=("HunyuanVideoDownBlock3D",) * blocks,
            up_block_types=("HunyuanVideoUpBlock3D",) * blocks,
            block_out_channels=preset.vae_channels,
            layers_per_block=1,
            norm_num_groups=preset.vae_groups,
            scaling_factor=HUNYUAN_VAE_SCALING_FACTOR,
            spatial_compression_ratio=2 ** (blocks - 1),
            temporal_compression_ratio=4,
        )
    return HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(**HUNYUAN_SCHEDULER),
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )


def init_model(preset: str, directory: Path) -> Path:
    """Write preset ``preset`` to ``directory`` unless something is there already; return it."""
    return write_preset(PRESETS, preset, directory, build_pipeline)
