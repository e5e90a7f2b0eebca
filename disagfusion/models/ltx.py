"""LTX-Video (``LTXPipeline``): a T5 text encoder, the ``LTXVideoTransformer3DModel`` with a
flow-matching Euler scheduler (resolution-dependent shift) on packed latents, and the
``AutoencoderKLLTXVideo`` causal video VAE (32× in space, 8× in time in real LTX-Video; the
preset's is 4× and 4×), optionally timestep-conditioned (LTX-Video 0.9.1 and later).

Tensors per job: encode -> ``prompt_embeds`` [1, 128, T5 width], ``prompt_attention_mask``
[1, 128] (bool) and, when guided, ``negative_prompt_embeds`` and ``negative_prompt_attention_mask``;
denoise -> ``latents`` as the pipeline keeps them: packed [1, F'·H'·W' (patches), C·p_t·p·p] and
still normalised; decode -> ``video`` uint8 [frames, H, W, 3] and ``image`` (its first frame).

The reference is ``stock_call``; the split stages are bitwise equal to it in float32 and bfloat16. What they
must match in it:
- built without a VAE, the pipeline assumes 32× / 8× compression, and without a transformer 1×1
  patches: each stage sets them from the configs (``prepare``); the denoiser needs the real
  ratios for the latent shape and the RoPE interpolation scale, the decoder the patch sizes to
  unpack.
- decode unpacks and denormalises with the pipeline's own static methods, in its order.
- a timestep-conditioned VAE decodes at ``decode_timestep`` after mixing in noise
  (``decode_noise_scale``) that the stock pipeline draws from the job's generator right after
  the initial latents, and from nothing else. The decoder replays that: it seeds a CPU generator
  with the job's seed, draws the initial latents' worth of numbers (float32, the unpacked
  latent shape, as ``prepare_latents``) and then the noise (in the latents' dtype). This is the
  cheapest exact way: a few numbers per latent element in the decoder (nothing next to the VAE),
  and nothing extra crosses the network (handing the noise on would double the latents' bytes;
  handing the generator state on would change the denoiser's handoff). It holds only because the
  denoise stage draws nothing else from the generator (Euler is deterministic), which is so for
  this scheduler. ``DECODE_TIMESTEP`` and ``DECODE_NOISE_SCALE`` are the values LTX-Video
  0.9.1's docs use; a VAE without timestep conditioning ignores both (and draws no noise).

``JobSpec.guidance`` is the pipeline's ``guidance_scale`` (classifier-free guidance with the
negative prompt above 1; both halves in one DiT batch). ``embedded_guidance`` is not used.
Height and width must be multiples of 32 (the pipeline checks) and of the VAE factor × the patch.

Batching: the decoder decodes job by job (the VAE's own slicing hands each slice the whole
batch's decode timesteps, which fails). Jobs in one denoise call round batched matmuls
differently. Measured on ltx-tiny with 2 jobs against each alone (float32, one thread): guided,
latents within 2.3e-6; unguided, within 4.8e-7; frames within 1/255 in both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
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

MAX_SEQUENCE_LENGTH = 128
"""T5 tokens per prompt: the stock pipeline's default."""
PIPELINE_SIZE_MULTIPLE = 32
"""The stock pipeline rejects other sizes, whatever the VAE."""
FRAME_RATE = 25
"""The stock pipeline's default ``frame_rate`` (it scales the DiT's temporal RoPE)."""
DECODE_TIMESTEP = 0.05
DECODE_NOISE_SCALE = 0.025
"""Decode-time conditioning of a timestep-conditioned VAE (LTX-Video 0.9.1's documented values)."""


def _config(directory: Path, component: str) -> dict:
    return json.loads((directory / component / "config.json").read_text())


def _compression(vae: dict) -> tuple[int, int]:
    """(spatial, temporal) compression of an ``AutoencoderKLLTXVideo`` config, as its ``__init__`` works them out."""
    scalings = 2 ** sum(vae["spatio_temporal_scaling"])
    spatial = vae.get("spatial_compression_ratio") or vae["patch_size"] * scalings
    temporal = vae.get("temporal_compression_ratio") or vae["patch_size_t"] * scalings
    return int(spatial), int(temporal)


class LTXFamily(DiffusersFamily):
    name = "ltx"
    pipeline_class = LTXPipeline.__name__
    stage_components = {"encode": ("tokenizer", "text_encoder"), "denoise": ("transformer", "scheduler"), "decode": ("vae",)}
    handoff = {
        "encode": ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask"),
        "denoise": ("latents",),
        "decode": ("video", "image"),
    }

    def geometry(self, directory: Path) -> VideoGeometry:
        spatial, temporal = _compression(_config(directory, "vae"))
        transformer = _config(directory, "transformer")
        return VideoGeometry(
            family=self.name,
            vae_scale_factor=spatial,
            size_multiple=max(PIPELINE_SIZE_MULTIPLE, spatial * transformer["patch_size"]),
            max_steps=scheduler_config(directory)["num_train_timesteps"],
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            temporal_factor=temporal * transformer["patch_size_t"],
            fps=FRAME_RATE,
        )

    def prepare(self, stage: str, pipe: LTXPipeline, directory: Path, settings: Settings) -> None:
        spatial, temporal = _compression(_config(directory, "vae"))
        transformer = _config(directory, "transformer")
        # Without a VAE the pipeline assumes 32× and 8×, without a transformer 1×1 patches.
        pipe.vae_spatial_compression_ratio = spatial
        pipe.vae_temporal_compression_ratio = temporal
        pipe.transformer_spatial_patch_size = transformer["patch_size"]
        pipe.transformer_temporal_patch_size = transformer["patch_size_t"]
        pipe.latent_channels = transformer["in_channels"]

    def stock_call(self, pipe: LTXPipeline, spec: JobSpec, output_type: str = "pil") -> Any:
        return pipe(
            spec.prompt,
            negative_prompt=spec.negative_prompt,
            guidance_scale=spec.guidance,
            num_frames=spec.frames,
            num_inference_steps=spec.steps,
            height=spec.height,
            width=spec.width,
            frame_rate=FRAME_RATE,
            generator=torch.Generator().manual_seed(spec.seed),
            output_type=output_type,
            decode_timestep=DECODE_TIMESTEP,
            decode_noise_scale=DECODE_NOISE_SCALE,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )

    def encode(self, pipe: LTXPipeline, specs: list[JobSpec]) -> list[Tensors]:
        embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
            [spec.prompt for spec in specs],
            negative_prompt=[spec.negative_prompt for spec in specs],
            do_classifier_free_guidance=any(spec.guided for spec in specs),
            device=pipe.device,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return with_negatives(
            specs,
            {"prompt_embeds": embeds, "prompt_attention_mask": mask},
            {"negative_prompt_embeds": negative_embeds, "negative_prompt_attention_mask": negative_mask},
        )

    def denoise(self, pipe: LTXPipeline, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback) -> list[Tensors]:
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
            num_frames=spec.frames,
            frame_rate=FRAME_RATE,
            callback_on_step_end=step_reporter(on_step, spec.steps),
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        ).frames
        return per_job({"latents": latents}, len(specs))

    def decode(self, pipe: LTXPipeline, specs: list[JobSpec], inputs: list[Tensors]) -> list[Tensors]:
        spec = specs[0]
        vae = pipe.vae
        shape = (
            pipe.latent_channels,
            (spec.frames - 1) // pipe.vae_temporal_compression_ratio + 1,
            spec.height // pipe.vae_spatial_compression_ratio,
            spec.width // pipe.vae_spatial_compression_ratio,
        )
        # The stock pipeline's arithmetic, in its order.
        latents = stacked(inputs, "latents", pipe.device)
        latents = pipe._unpack_latents(
            latents, *shape[1:], pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size
        )
        latents = pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        latents = latents.to(vae.dtype)  # the stock call's prompt_embeds dtype: every component loads in one
        # One job at a time, as the VAE's slicing would (and its slicing hands every slice the
        # whole batch's timesteps, which a timestep-conditioned decoder cannot take).
        videos = []
        for spec, job_latents in zip(specs, latents.split(1)):
            timestep = None
            if vae.config.timestep_conditioning:
                noise = _decode_noise(spec.seed, shape, job_latents.dtype).to(job_latents.device)
                timestep = torch.tensor([DECODE_TIMESTEP], device=job_latents.device, dtype=job_latents.dtype)
                scale = torch.tensor([DECODE_NOISE_SCALE], device=job_latents.device, dtype=job_latents.dtype)[
                    :, None, None, None, None
                ]
                job_latents = (1 - scale) * job_latents + scale * noise
            videos.append(vae.decode(job_latents.to(vae.dtype), timestep, return_dict=False)[0])
        video = torch.cat(videos)
        return video_pixels(pipe.video_processor.postprocess_video(video, output_type="pt"))


def _decode_noise(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The decode noise the stock pipeline draws for a job: its generator's next numbers after the
    initial latents (float32, the unpacked latent shape, drawn first in ``prepare_latents``)."""
    generator = torch.Generator().manual_seed(seed)
    torch.randn((1, *shape), generator=generator, dtype=torch.float32)
    return torch.randn((1, *shape), generator=generator, dtype=dtype)


FAMILY = LTXFamily()


# ------------------------------------------------------------------ presets


class Preset(BaseModel):
    model_config = ConfigDict(frozen=True)

    seed: int
    t5_dim: int
    t5_layers: int
    dit_layers: int
    dit_heads: int
    dit_head_dim: int
    latent_channels: int
    vae_channels: int
    timestep_conditioning: bool


PRESETS: dict[str, Preset] = {
    "ltx-tiny": Preset(
        seed=90, t5_dim=32, t5_layers=1, dit_layers=1, dit_heads=2, dit_head_dim=8, latent_channels=8,
        vae_channels=8, timestep_conditioning=True,  # as LTX-Video 0.9.1+
    ),
}

# LTX-Video's scheduler (Lightricks/LTX-Video, scheduler_config.json).
LTX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
    base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1,
)


def build_pipeline(preset: Preset) -> LTXPipeline:
    """The preset's pipeline in memory, every component initialised from its own seed."""
    tokenizer = t5_tokenizer()
    tokenizer.model_max_length = MAX_SEQUENCE_LENGTH  # as LTX-Video's tokenizer config
    with seeded(preset.seed):
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer), d_model=preset.t5_dim, d_kv=preset.t5_dim // 2, d_ff=preset.t5_dim * 2,
                num_layers=preset.t5_layers, num_heads=2, feed_forward_proj="gated-gelu",
                is_encoder_decoder=False, use_cache=False,
            )
        )
    with seeded(preset.seed + 1):
        transformer = LTXVideoTransformer3DModel(
            in_channels=preset.latent_channels, out_channels=preset.latent_channels, patch_size=1, patch_size_t=1,
            num_attention_heads=preset.dit_heads, attention_head_dim=preset.dit_head_dim,
            cross_attention_dim=preset.dit_heads * preset.dit_head_dim, num_layers=preset.dit_layers,
            caption_channels=preset.t5_dim,
        )
    with seeded(preset.seed + 2):
        channels = (preset.vae_channels,) * 4
        vae = AutoencoderKLLTXVideo(
            in_channels=3, out_channels=3, latent_channels=preset.latent_channels,
            block_out_channels=channels, decoder_block_out_channels=channels,
            layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
            # Two space-time scalings: 4× in space and in time.
            spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
            timestep_conditioning=preset.timestep_conditioning, patch_size=1, patch_size_t=1,
            encoder_causal=True, decoder_causal=False,
        )
    return LTXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**LTX_SCHEDULER),
    )


def init_model(preset: str, directory: Path) -> Path:
    """Write preset ``preset`` to ``directory`` unless something is there already; return it."""
    return write_preset(PRESETS, preset, directory, build_pipeline)
