"""CogVideoX (``CogVideoXPipeline``): a T5 text encoder, the ``CogVideoXTransformer3DModel`` (an
expert-adaptive-norm DiT over text and video tokens in one sequence) with CogVideoX's DDIM
scheduler (v-prediction, zero terminal SNR), and the causal 3D ``AutoencoderKLCogVideoX``
(8× in space, 4× in time in real CogVideoX-2b, whose configs the preset copies).

Tensors per job: encode -> ``prompt_embeds`` [1, L, T5 width] and, when guided,
``negative_prompt_embeds``; denoise -> ``latents`` as the pipeline keeps them, frames first:
[1, (frames - 1) / 4 + 1, C, H/f, W/f]; decode -> ``video`` uint8 [frames, H, W, 3] and ``image``
(its first frame).

Frames: the pipeline makes ``(num_frames - 1) // 4 + 1`` latent frames, and the VAE decodes
them two at a time (``num_latent_frames_batch_size``, the leftover one with the first pair), each
causal 2× time upsampling keeping a lone first frame: an odd count T of latent frames comes back
as 4T - 3 frames, an even one as 4T. Only 8k + 1 frames come back as asked (measured: 1, 9, 17,
25 do; 5 -> 8, 13 -> 16), as CogVideoX's own 49 and CogVideoX 1.5's 81: ``VideoGeometry`` asks
for 8k + 1 (``temporal_factor`` = the VAE config's 4 × the 2 latent frames it decodes at once).
Height and width must be multiples of 8 (the pipeline checks) and of the VAE factor × the DiT's
patch (``size_multiple``).

The reference is ``stock_call``; the split stages are bitwise equal to it in float32 and bfloat16
(also from an fp16 sharded checkpoint). What they must match in it:
- ``max_sequence_length`` must equal the transformer's ``max_text_seq_length`` (226 in real
  CogVideoX): the DiT adds its sin-cos table, laid out for exactly that many text tokens, to
  the joint sequence (another length does not add up), while the pipeline defaults to 226
  whatever the DiT. The stock call and both stages pass the config's value.
- decode runs the pipeline's own ``decode_latents``, whose ``1 / scaling_factor * latents`` is
  not ``latents / scaling_factor`` (4.5e-7 apart), then its video processor.
- built without a VAE, the pipeline assumes 8× / 4× scale factors (and 0.7 for the latents'
  scale): the denoise stage sets the factors from the VAE config (``prepare``).
- CogVideoX 1.5 transformers (``patch_size_t``) pad the latent frames to a multiple of it and
  the stock call drops the padding before decoding: the decoder does the same (untested here:
  the preset is a 1.0 model, as CogVideoX-2b).

``JobSpec.guidance`` is the pipeline's ``guidance_scale`` (classifier-free guidance with the
negative prompt above 1; both halves in one DiT batch). ``embedded_guidance`` is not used.

Batching jobs in one denoise call rounds batched matmuls differently. Measured on cogvideox-tiny
with 2 jobs against each alone (float32): guided, latents within 3.8e-6 and frames within 1/255;
unguided, latents within 4.2e-7 and frames equal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel,
)
from pydantic import BaseModel, ConfigDict
from transformers import T5Config, T5EncoderModel

from disagfusion.config import Settings
from disagfusion.models.base import StepCallback, Tensors, seeded, write_preset
from disagfusion.models.family import (
    DiffusersFamily, VideoGeometry, denoise_arguments, per_job, scheduler_config, stacked, step_reporter,
    video_pixels, with_negatives,
)
from disagfusion.models.tokenizers import t5_tokenizer
from disagfusion.protocol import JobSpec

# The stock pipeline rejects other sizes, whatever the VAE.
PIPELINE_SIZE_MULTIPLE = 8
LATENT_FRAMES_PER_DECODE = 2
"""``AutoencoderKLCogVideoX.num_latent_frames_batch_size`` (set in its ``__init__``, not its config)."""


def _config(directory: Path, component: str) -> dict:
    return json.loads((directory / component / "config.json").read_text())


class CogVideoXFamily(DiffusersFamily):
    name = "cogvideox"
    pipeline_class = CogVideoXPipeline.__name__
    stage_components = {"encode": ("tokenizer", "text_encoder"), "denoise": ("transformer", "scheduler"), "decode": ("vae",)}
    handoff = {
        "encode": ("prompt_embeds", "negative_prompt_embeds"),
        "denoise": ("latents",),
        "decode": ("video", "image"),
    }

    def geometry(self, directory: Path) -> VideoGeometry:
        vae = AutoencoderKLCogVideoX.load_config(directory / "vae")
        transformer = CogVideoXTransformer3DModel.load_config(directory / "transformer")
        vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        return VideoGeometry(
            family=self.name,
            vae_scale_factor=vae_scale_factor,
            size_multiple=max(PIPELINE_SIZE_MULTIPLE, vae_scale_factor * transformer["patch_size"]),
            max_steps=scheduler_config(directory)["num_train_timesteps"],
            max_sequence_length=transformer["max_text_seq_length"],
            # Frames per pair of latent frames: see the module docstring.
            temporal_factor=int(vae["temporal_compression_ratio"]) * LATENT_FRAMES_PER_DECODE,
        )

    def prepare(self, stage: str, pipe: CogVideoXPipeline, directory: Path, settings: Settings) -> None:
        geometry = self.geometry(directory)
        # Without a VAE the pipeline assumes 8× and 4×; use the real factors.
        pipe.vae_scale_factor_spatial = geometry.vae_scale_factor
        pipe.vae_scale_factor_temporal = geometry.temporal_factor // LATENT_FRAMES_PER_DECODE
        # The encoder has no transformer to read the text length from.
        pipe.max_text_seq_length = geometry.max_sequence_length
        # The decoder drops the frames a CogVideoX 1.5 DiT pads the latents with (None: 1.0).
        pipe.patch_size_t = _config(directory, "transformer").get("patch_size_t")

    def stock_call(self, pipe: CogVideoXPipeline, spec: JobSpec, output_type: str = "pil") -> Any:
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
            max_sequence_length=pipe.transformer.config.max_text_seq_length,  # the DiT's, not the default
        )

    def encode(self, pipe: CogVideoXPipeline, specs: list[JobSpec]) -> list[Tensors]:
        embeds, negative_embeds = pipe.encode_prompt(
            [spec.prompt for spec in specs],
            negative_prompt=[spec.negative_prompt for spec in specs],
            do_classifier_free_guidance=any(spec.guided for spec in specs),
            device=pipe.device,
            max_sequence_length=pipe.max_text_seq_length,
        )
        return with_negatives(specs, {"prompt_embeds": embeds}, {"negative_prompt_embeds": negative_embeds})

    def denoise(self, pipe: CogVideoXPipeline, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback) -> list[Tensors]:
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
            max_sequence_length=pipe.max_text_seq_length,
        ).frames
        return per_job({"latents": latents}, len(specs))

    def decode(self, pipe: CogVideoXPipeline, specs: list[JobSpec], inputs: list[Tensors]) -> list[Tensors]:
        latents = stacked(inputs, "latents", pipe.device).to(pipe.vae.dtype)
        if pipe.patch_size_t is not None:  # CogVideoX 1.5: drop the padding frames, as the stock call
            latent_frames = (specs[0].frames - 1) // pipe.vae_scale_factor_temporal + 1
            latents = latents[:, latents.shape[1] - latent_frames:]
        video = pipe.decode_latents(latents)  # the pipeline's own arithmetic: (1 / s) * latents
        return video_pixels(pipe.video_processor.postprocess_video(video=video, output_type="pt"))


FAMILY = CogVideoXFamily()


# ------------------------------------------------------------------ presets


class Preset(BaseModel):
    model_config = ConfigDict(frozen=True)

    seed: int
    t5_dim: int
    t5_layers: int
    dit_layers: int
    dit_heads: int
    dit_head_dim: int
    time_embed_dim: int
    sample_size: tuple[int, int, int]
    """The DiT's native (frames, height, width), in frames and latent pixels; other sizes
    recompute its sin-cos position table on the fly, as the real one does off 49 × 60 × 90."""
    vae_channels: tuple[int, ...]
    vae_groups: int


PRESETS: dict[str, Preset] = {
    "cogvideox-tiny": Preset(
        seed=70, t5_dim=32, t5_layers=1, dit_layers=1, dit_heads=2, dit_head_dim=16, time_embed_dim=16,
        sample_size=(9, 4, 4), vae_channels=(8, 8, 16, 16), vae_groups=4,  # 8× in space, as CogVideoX-2b
    ),
}

LATENT_CHANNELS = 16
MAX_TEXT_SEQ_LENGTH = 226
"""T5 tokens per prompt, CogVideoX's (the transformer config's ``max_text_seq_length``)."""
# CogVideoX-2b's scheduler and VAE normalisation (THUDM/CogVideoX-2b).
COGVIDEOX_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
    rescale_betas_zero_snr=True, snr_shift_scale=3.0, timestep_spacing="trailing",
)
COGVIDEOX_VAE_SCALING_FACTOR = 1.15258426


def build_pipeline(preset: Preset) -> CogVideoXPipeline:
    """The preset's pipeline in memory, every component initialised from its own seed."""
    tokenizer = t5_tokenizer()
    tokenizer.model_max_length = MAX_TEXT_SEQ_LENGTH  # as CogVideoX's tokenizer config
    with seeded(preset.seed):
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer), d_model=preset.t5_dim, d_kv=preset.t5_dim // 2, d_ff=preset.t5_dim * 2,
                num_layers=preset.t5_layers, num_heads=2, feed_forward_proj="gated-gelu",
                is_encoder_decoder=False, use_cache=False,
            )
        )
    frames, height, width = preset.sample_size
    with seeded(preset.seed + 1):
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=preset.dit_heads, attention_head_dim=preset.dit_head_dim,
            in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, time_embed_dim=preset.time_embed_dim,
            text_embed_dim=preset.t5_dim, num_layers=preset.dit_layers, sample_width=width, sample_height=height,
            sample_frames=frames, patch_size=2, max_text_seq_length=MAX_TEXT_SEQ_LENGTH,
            use_rotary_positional_embeddings=False,  # CogVideoX-2b: sin-cos positions
        )
    with seeded(preset.seed + 2):
        blocks = len(preset.vae_channels)
        vae = AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * blocks,
            up_block_types=("CogVideoXUpBlock3D",) * blocks,
            block_out_channels=preset.vae_channels,
            latent_channels=LATENT_CHANNELS,
            layers_per_block=1,
            norm_num_groups=preset.vae_groups,
            temporal_compression_ratio=4,
            scaling_factor=COGVIDEOX_VAE_SCALING_FACTOR,
        )
    return CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER),
    )


def init_model(preset: str, directory: Path) -> Path:
    """Write preset ``preset`` to ``directory`` unless something is there already; return it."""
    return write_preset(PRESETS, preset, directory, build_pipeline)
