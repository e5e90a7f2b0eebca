"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): two CLIP text encoders with
projection and a T5 encoder, the MMDiT ``SD3Transformer2DModel`` with a flow-matching Euler
scheduler, and a 16-channel VAE with a shift factor.

Tensors per job: encode -> ``prompt_embeds`` [1, 77 + 256, T5 width] (both CLIPs' penultimate
hidden states side by side, zero-padded to the T5 width, then the T5 tokens),
``pooled_prompt_embeds`` [1, both CLIP projections] and, when guided, the two negatives;
denoise -> ``latents`` [1, C, H/f, W/f]; decode -> ``image``.

The reference is ``stock_call``: CFG from ``guidance`` with the negative prompt, the pipeline's
defaults otherwise (``max_sequence_length`` 256, no clip skip, no skip-layer guidance).
The split stages are bitwise equal to it in float32 and bfloat16 (the DiT cast in ``prepare``
included: see there).

Batching jobs in one denoise call rounds batched matmuls differently. Measured on sd3-tiny with
3 jobs against each alone: float32, latents within 2.2e-6 and pixels within 1/255; bfloat16 with
CFG equal, without CFG about 15% of latent values one ulp off (1/64 near 4), which the random
tiny VAE turns into up to 14/255.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline,
)
from pydantic import BaseModel, ConfigDict
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from disagfusion.config import Settings
from disagfusion.models.base import SpecError, StepCallback, Tensors, seeded, write_preset
from disagfusion.models.family import (
    DiffusersFamily, ImageGeometry, denoise_arguments, image_pixels, per_job, scheduler_config, stacked,
    step_reporter, with_negatives,
)
from disagfusion.models.tokenizers import clip_tokenizer, t5_tokenizer
from disagfusion.protocol import JobSpec
from disagfusion.transport.ref import DTYPES

MAX_SEQUENCE_LENGTH = 256
"""T5 tokens, the stock pipeline's default (at most 512)."""


class SD3Geometry(ImageGeometry):
    """SD3's DiT crops a fixed table of position embeddings: larger images cannot run at all."""

    max_size: int

    def check(self, spec: JobSpec) -> None:
        super().check(spec)
        for field in ("height", "width"):
            value = getattr(spec, field)
            if value > self.max_size:
                raise SpecError(field, f"{value} is more than the {self.max_size} pixels this model's position embeddings cover")


class SD3Family(DiffusersFamily):
    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline.__name__
    prompt_tokenizer = "tokenizer_3"  # T5: the text length; CLIP always truncates at 77
    resumable = True
    stage_components = {
        "encode": ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3"),
        "denoise": ("transformer", "scheduler"),
        "decode": ("vae",),
    }
    handoff = {
        "encode": ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"),
        "denoise": ("latents",),
        "decode": ("image",),
    }

    def geometry(self, directory: Path) -> SD3Geometry:
        vae_scale_factor = 2 ** (len(AutoencoderKL.load_config(directory / "vae")["block_out_channels"]) - 1)
        transformer = SD3Transformer2DModel.load_config(directory / "transformer")
        # check_inputs demands multiples of the latent factor times the patch.
        multiple = vae_scale_factor * transformer["patch_size"]
        return SD3Geometry(
            family=self.name,
            vae_scale_factor=vae_scale_factor,
            size_multiple=multiple,
            max_steps=scheduler_config(directory)["num_train_timesteps"],
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            max_size=transformer["pos_embed_max_size"] * multiple,
        )

    def stock_call(self, pipe: StableDiffusion3Pipeline, spec: JobSpec, output_type: str = "pil") -> Any:
        return pipe(
            spec.prompt,
            negative_prompt=spec.negative_prompt,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance,
            height=spec.height,
            width=spec.width,
            generator=torch.Generator().manual_seed(spec.seed),
            output_type=output_type,
        )

    def prepare(self, stage: str, pipe: Any, directory: Path, settings: Settings) -> None:
        if stage == "denoise":
            # Without accelerate, diffusers 0.42 loads this DiT in float32 whatever the dtype
            # asked: it assigns the file's tensors in place because the first entry of the
            # state dict, the float32 position-embedding buffer, matches the file's dtype. With
            # accelerate it casts every tensor to the dtype; casting here gives the same bits.
            pipe.transformer.to(DTYPES[settings.dtype])

    def encode(self, pipe: StableDiffusion3Pipeline, specs: list[JobSpec]) -> list[Tensors]:
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=[spec.prompt for spec in specs],
            prompt_2=None,
            prompt_3=None,
            device=pipe.device,
            do_classifier_free_guidance=any(spec.guided for spec in specs),
            negative_prompt=[spec.negative_prompt for spec in specs],
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return with_negatives(
            specs, {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled},
            {"negative_prompt_embeds": negative_embeds, "negative_pooled_prompt_embeds": negative_pooled},
        )

    def denoise(self, pipe: StableDiffusion3Pipeline, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback) -> list[Tensors]:
        spec = specs[0]
        latents = pipe(
            **denoise_arguments(specs),
            prompt=None,
            prompt_embeds=stacked(inputs, "prompt_embeds", pipe.device),
            pooled_prompt_embeds=stacked(inputs, "pooled_prompt_embeds", pipe.device),
            negative_prompt_embeds=stacked(inputs, "negative_prompt_embeds", pipe.device),
            negative_pooled_prompt_embeds=stacked(inputs, "negative_pooled_prompt_embeds", pipe.device),
            guidance_scale=spec.guidance,
            callback_on_step_end=step_reporter(on_step, spec.steps),
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        ).images
        return per_job({"latents": latents}, len(specs))

    def decode(self, pipe: StableDiffusion3Pipeline, specs: list[JobSpec], inputs: list[Tensors]) -> list[Tensors]:
        latents = stacked(inputs, "latents", pipe.device).to(pipe.vae.dtype)
        # The stock pipeline's arithmetic, in its order.
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        return image_pixels(image, pipe.image_processor)


FAMILY = SD3Family()


# ------------------------------------------------------------------ presets


class Preset(BaseModel):
    model_config = ConfigDict(frozen=True)

    seed: int
    clip_dims: tuple[int, int]
    """Hidden widths of the two CLIP encoders (their projections are as wide)."""
    clip_layers: int
    """At least 2: the pipeline reads the penultimate hidden state."""
    t5_dim: int
    """At least the two CLIP widths added: CLIP is zero-padded to it."""
    t5_layers: int
    dit_layers: int
    dit_heads: int
    dit_head_dim: int
    pos_embed_max_size: int
    vae_channels: tuple[int, ...]
    vae_groups: int


PRESETS: dict[str, Preset] = {
    "sd3-tiny": Preset(
        seed=30, clip_dims=(16, 24), clip_layers=2, t5_dim=48, t5_layers=1,
        # 16 position embeddings a side allow 256×256; more would outweigh this tiny DiT's
        # parameters in its weight file (real SD3: 192 a side, a few % of the file).
        dit_layers=3, dit_heads=2, dit_head_dim=16, pos_embed_max_size=16,
        vae_channels=(8, 8, 16, 16), vae_groups=4,  # scales by 8, as SD3's VAE
    ),
}

LATENT_CHANNELS = 16
# SD3's VAE normalisation and scheduler (stabilityai/stable-diffusion-3-medium-diffusers).
SD3_VAE = dict(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


def clip_encoder(tokenizer, width: int, layers: int) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 2, projection_dim=width,
            num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )


def t5_encoder(tokenizer, width: int, layers: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=width, d_kv=width // 2, d_ff=width * 2, num_layers=layers,
            num_heads=2, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        )
    )


def build_pipeline(preset: Preset) -> StableDiffusion3Pipeline:
    """The preset's pipeline in memory, every component initialised from its own seed."""
    tokenizer = clip_tokenizer()
    tokenizer_2 = clip_tokenizer(pad_token="!")  # SD3's second CLIP tokenizer pads with "!"
    tokenizer_3 = t5_tokenizer()
    with seeded(preset.seed):
        text_encoder = clip_encoder(tokenizer, preset.clip_dims[0], preset.clip_layers)
    with seeded(preset.seed + 1):
        text_encoder_2 = clip_encoder(tokenizer_2, preset.clip_dims[1], preset.clip_layers)
    with seeded(preset.seed + 2):
        text_encoder_3 = t5_encoder(tokenizer_3, preset.t5_dim, preset.t5_layers)
    with seeded(preset.seed + 3):
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            num_layers=preset.dit_layers,
            attention_head_dim=preset.dit_head_dim,
            num_attention_heads=preset.dit_heads,
            joint_attention_dim=preset.t5_dim,
            caption_projection_dim=preset.dit_heads * preset.dit_head_dim,
            pooled_projection_dim=sum(preset.clip_dims),
            pos_embed_max_size=preset.pos_embed_max_size,
            qk_norm="rms_norm",  # as SD3.5
        )
    with seeded(preset.seed + 4):
        blocks = len(preset.vae_channels)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=preset.vae_channels,
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=preset.vae_groups,
            **SD3_VAE,
        )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def init_model(preset: str, directory: Path) -> Path:
    """Write preset ``preset`` to ``directory`` unless something is there already; return it."""
    return write_preset(PRESETS, preset, directory, build_pipeline)
