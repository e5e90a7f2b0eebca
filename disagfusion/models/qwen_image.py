"""Qwen-Image (``QwenImagePipeline``): a Qwen2.5-VL text encoder (its language model only), the
Qwen-Image MMDiT with a flow-matching Euler scheduler, and the Qwen-Image (Wan-style, causal 3-D)
VAE.

Tensors per job: encode -> ``prompt_embeds`` [1, L, D] and, when guided,
``negative_prompt_embeds`` [1, L', D], each cut to the job's own tokens (no padding, so no mask
to hand on); denoise -> ``latents``, packed [1, (H/f/2)·(W/f/2), 4·C]; decode -> ``image``.

The stock call this family reproduces (``stock_call``): ``true_cfg_scale=spec.guidance`` with
``negative_prompt=spec.negative_prompt`` when ``spec.guided`` and ``None`` otherwise (true CFG
is off then); ``guidance_scale`` left None (Qwen-Image is not guidance-distilled);
``max_sequence_length=512`` (the pipeline's default, spelled out).

Findings that shape the code:
- The prompt is wrapped in a chat template and the encoder's first
  ``prompt_template_encode_start_idx`` (34) hidden states are dropped. That number is set in the
  pipeline's ``__init__``, not in any config, and counts real Qwen2 tokens of the system prompt.
  With the tiny preset's tokenizer the system prompt is 81 tokens, so 47 of them stay in the
  embeds. The split encoder must NOT recompute the number: the stock pipeline loaded with
  ``from_pretrained`` uses 34, and equality needs both to run ``encode_prompt`` with the same
  value. Harmless: the template alone is longer than 34 tokens, and ``<|im_start|>`` /
  ``<|im_end|>`` are single special tokens as in the real vocabulary.
- ``encode_prompt`` pads a batch to its longest prompt with zeros and returns a mask, which is
  None when nothing is padded (always, for one prompt). The encoder hands each job its embeds
  cut to its own length; the denoiser pads the jobs of its batch exactly as
  ``_get_qwen_prompt_embeds`` pads a batch of prompts (zeros after, mask ones then zeros; the
  negatives separately). So a denoise batch equals the stock pipeline called with those prompts
  as a list, bit for bit (as latents: the stock pipeline decodes a list as one VAE batch, the
  decode stage one job at a time, which rounds differently). A job in a batch is not bitwise the
  job alone: padding changes the rounding of the text encoder (embeds within 5e-7) and of the
  DiT's masked attention (latents within 3e-6); measured on the tiny preset, at most 1/255 in
  uint8 (tests/models/test_qwen_image.py).
- Latents are packed 2×2, so sizes must be multiples of twice the VAE factor (the stock pipeline
  only warns, then silently makes a smaller image); decoding unpacks to 5-D [B, C, 1, h, w] and
  un-normalises with the pipeline's exact arithmetic (``x / (1 / std) + mean``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel,
)
from pydantic import BaseModel, ConfigDict
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from disagfusion.models.base import StepCallback, Tensors, seeded, write_preset
from disagfusion.models.family import (
    DiffusersFamily, ImageGeometry, add_negatives, denoise_arguments, image_pixels, per_job, scheduler_config,
    stacked, step_reporter,
)
from disagfusion.models.tokenizers import qwen2_tokenizer
from disagfusion.protocol import JobSpec

MAX_SEQUENCE_LENGTH = 512
"""Prompt tokens kept after the template (``QwenImagePipeline.__call__``'s default)."""

PACK = 2
"""The pipeline packs latents in 2×2 patches (hard-coded, whatever the transformer config says)."""


class QwenImageFamily(DiffusersFamily):
    name = "qwen-image"
    pipeline_class = QwenImagePipeline.__name__
    resumable = True
    stage_components = {"encode": ("tokenizer", "text_encoder"), "denoise": ("transformer", "scheduler"), "decode": ("vae",)}
    handoff = {"encode": ("prompt_embeds", "negative_prompt_embeds"), "denoise": ("latents",), "decode": ("image",)}

    def geometry(self, directory: Path) -> ImageGeometry:
        # As QwenImagePipeline.__init__ computes it: one spatial halving per temporal-downsample entry.
        vae_scale_factor = 2 ** len(AutoencoderKLQwenImage.load_config(directory / "vae")["temperal_downsample"])
        return ImageGeometry(
            family=self.name,
            vae_scale_factor=vae_scale_factor,
            size_multiple=vae_scale_factor * PACK,
            max_steps=scheduler_config(directory)["num_train_timesteps"],
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )

    def stock_call(self, pipe: QwenImagePipeline, spec: JobSpec, output_type: str = "pil") -> Any:
        return pipe(
            spec.prompt,
            negative_prompt=spec.negative_prompt if spec.guided else None,
            true_cfg_scale=spec.guidance,
            num_inference_steps=spec.steps,
            height=spec.height,
            width=spec.width,
            generator=torch.Generator().manual_seed(spec.seed),
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            output_type=output_type,
        )

    def encode(self, pipe: QwenImagePipeline, specs: list[JobSpec]) -> list[Tensors]:
        # One text-encoder call for all prompts and one for the negatives of the guided jobs, as
        # the stock pipeline encodes a list of prompts.
        def encoded(prompts: list[str], name: str) -> list[Tensors]:
            embeds, mask = pipe.encode_prompt(prompts, device=pipe.device, max_sequence_length=MAX_SEQUENCE_LENGTH)
            return [{name: e} for e in unpadded(embeds, mask)]

        jobs = encoded([spec.prompt for spec in specs], "prompt_embeds")
        return add_negatives(specs, jobs, lambda negatives: encoded(negatives, "negative_prompt_embeds"))

    def denoise(self, pipe: QwenImagePipeline, specs: list[JobSpec], inputs: list[Tensors], on_step: StepCallback) -> list[Tensors]:
        spec = specs[0]  # one shape_key: same size, steps and guidance for all
        embeds, mask = padded([job["prompt_embeds"] for job in inputs], pipe.device)
        negative, negative_mask = None, None
        if spec.guided:
            negative, negative_mask = padded([job["negative_prompt_embeds"] for job in inputs], pipe.device)
        latents = pipe(
            **denoise_arguments(specs),
            prompt=None,
            negative_prompt=None,
            prompt_embeds=embeds,
            prompt_embeds_mask=mask,  # encode_prompt turns an all-ones mask into None, as for one prompt
            negative_prompt_embeds=negative,
            negative_prompt_embeds_mask=negative_mask,
            true_cfg_scale=spec.guidance,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            callback_on_step_end=step_reporter(on_step, spec.steps),
        ).images
        return per_job({"latents": latents}, len(specs))

    def decode(self, pipe: QwenImagePipeline, specs: list[JobSpec], inputs: list[Tensors]) -> list[Tensors]:
        spec = specs[0]
        # QwenImagePipeline.__call__'s arithmetic, step for step (x / (1 / std) is not x * std).
        latents = pipe._unpack_latents(stacked(inputs, "latents", pipe.device), spec.height, spec.width, pipe.vae_scale_factor)
        latents = latents.to(pipe.vae.dtype)
        z_dim = pipe.vae.config.z_dim
        latents_mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        latents_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        latents = latents / latents_std + latents_mean
        image = pipe.vae.decode(latents, return_dict=False)[0][:, :, 0]  # the one frame
        return image_pixels(image, pipe.image_processor)


def unpadded(embeds: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each prompt's embeds [1, L_i, D] without the batch's padding (mask None: none padded)."""
    lengths = [embeds.shape[1]] * embeds.shape[0] if mask is None else mask.sum(dim=1).tolist()
    return [embeds[i : i + 1, :length].clone() for i, length in enumerate(lengths)]


def padded(embeds: list[torch.Tensor], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Jobs' embeds as one batch, padded as ``_get_qwen_prompt_embeds`` pads a batch of prompts:
    zeros after each, and a long mask of ones then zeros."""
    longest = max(e.shape[1] for e in embeds)
    batch = torch.cat([F.pad(e, (0, 0, 0, longest - e.shape[1])) for e in embeds]).to(device)
    mask = torch.stack([torch.arange(longest) < e.shape[1] for e in embeds]).long().to(device)
    return batch, mask


FAMILY = QwenImageFamily()


# ------------------------------------------------------------------ the tiny preset


class Preset(BaseModel):
    model_config = ConfigDict(frozen=True)

    seed: int
    vocab_size: int
    text_dim: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    mrope_section: tuple[int, int, int]
    """Qwen2.5-VL's multimodal RoPE split of half a text head (sums to head_dim / 2)."""
    dit_layers: int
    dit_heads: int
    dit_head_dim: int
    rope_axes: tuple[int, int, int]
    """The DiT's RoPE dims per axis (frame, height, width); they sum to its head dim."""
    vae_dim: int
    vae_mult: tuple[int, ...]
    """The VAE halves the image size len - 1 times."""


PRESETS: dict[str, Preset] = {
    "qwen-image-tiny": Preset(
        seed=0, vocab_size=1000, text_dim=32, text_layers=2, text_heads=2, text_kv_heads=1, mrope_section=(2, 3, 3),
        dit_layers=1, dit_heads=2, dit_head_dim=16, rope_axes=(4, 6, 6),
        vae_dim=8, vae_mult=(1, 2, 2),
    ),
}

# Qwen/Qwen-Image's scheduler_config.json: resolution-dependent ("dynamic") shift of the
# exponential kind, with mu from the packed image length between these bounds.
QWEN_IMAGE_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
    invert_sigmas=False,
    stochastic_sampling=False,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
)

# The real VAE's latent statistics (16 channels), spelled out so a diffusers upgrade that changes
# defaults does not silently change the preset.
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
Z_DIM = len(LATENTS_MEAN)


def build_pipeline(preset: Preset) -> QwenImagePipeline:
    """The preset's pipeline in memory, every component initialised from its own seed."""
    tokenizer = qwen2_tokenizer(preset.vocab_size)
    with seeded(preset.seed):
        text_encoder = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(
                text_config=dict(
                    vocab_size=len(tokenizer),
                    hidden_size=preset.text_dim,
                    intermediate_size=preset.text_dim * 2,
                    num_hidden_layers=preset.text_layers,
                    num_attention_heads=preset.text_heads,
                    num_key_value_heads=preset.text_kv_heads,
                    rope_parameters={"rope_type": "default", "mrope_section": list(preset.mrope_section)},
                    bos_token_id=None,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                ),
                # The vision tokens' ids in this vocabulary (as the real config names the real ones).
                image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
                vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
                vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
                # encode_prompt never shows it an image, but the class always builds one: keep it minimal.
                vision_config=dict(
                    depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2,
                    temporal_patch_size=2, spatial_merge_size=2, window_size=8,
                    out_hidden_size=preset.text_dim, fullatt_block_indexes=[0],
                ),
            )
        )
    with seeded(preset.seed + 1):
        transformer = QwenImageTransformer2DModel(
            patch_size=PACK,
            in_channels=Z_DIM * PACK * PACK,
            out_channels=Z_DIM,
            num_layers=preset.dit_layers,
            attention_head_dim=preset.dit_head_dim,
            num_attention_heads=preset.dit_heads,
            joint_attention_dim=preset.text_dim,
            axes_dims_rope=preset.rope_axes,
        )
    with seeded(preset.seed + 2):
        vae = AutoencoderKLQwenImage(
            base_dim=preset.vae_dim,
            z_dim=Z_DIM,
            dim_mult=list(preset.vae_mult),
            num_res_blocks=1,
            temperal_downsample=[False] + [True] * (len(preset.vae_mult) - 2),
            latents_mean=LATENTS_MEAN,
            latents_std=LATENTS_STD,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def init_model(preset: str, directory: Path) -> Path:
    """Write preset ``preset`` to ``directory`` unless something is there already; return it."""
    return write_preset(PRESETS, preset, directory, build_pipeline)
