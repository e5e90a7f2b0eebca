"""Built-in models: small PixArt-Sigma pipelines with seeded random weights, made offline.

A preset is written as an ordinary diffusers directory (``model_index.json`` plus one
``save_pretrained`` folder per component), so the stages load it exactly as they load a real
PixArt-Sigma checkpoint. The weights mean nothing; the shapes and the cost split between
stages are what matter: ``tiny`` runs in milliseconds for tests, ``small`` is sized so that, as
in real models, the DiT takes most of a job's time, the VAE decoder most of the rest and the
text encoder little.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
from pydantic import BaseModel, ConfigDict
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from disagfusion.models.base import seeded, write_preset


class Preset(BaseModel):
    model_config = ConfigDict(frozen=True)

    seed: int
    text_dim: int
    text_layers: int
    text_heads: int
    dit_layers: int
    dit_heads: int
    dit_head_dim: int
    patch_size: int
    vae_channels: tuple[int, ...]
    """One VAE block per entry; the VAE scales by 2 ** (len - 1)."""
    vae_layers: int
    vae_groups: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        seed=0, text_dim=32, text_layers=1, text_heads=2,
        dit_layers=1, dit_heads=2, dit_head_dim=16, patch_size=2,
        vae_channels=(8, 8, 16), vae_layers=1, vae_groups=4,
    ),
    "small": Preset(
        seed=1, text_dim=256, text_layers=2, text_heads=4,
        dit_layers=3, dit_heads=3, dit_head_dim=64, patch_size=2,
        vae_channels=(32, 64, 64, 64), vae_layers=1, vae_groups=16,
    ),
}

# PixArt-Sigma's own scheduler settings (the defaults of DPMSolverMultistepScheduler, spelled
# out so a diffusers upgrade that changes defaults does not silently change the presets).
PIXART_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    timestep_spacing="linspace",
)

LATENT_CHANNELS = 4

def build_pipeline(preset: Preset) -> PixArtSigmaPipeline:
    """The preset's pipeline in memory, every component initialised from its own seed."""
    tokenizer = ByT5Tokenizer()  # byte-level: needs no vocabulary file, so nothing is downloaded
    with seeded(preset.seed):
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=preset.text_dim,
                d_kv=preset.text_dim // preset.text_heads,
                d_ff=preset.text_dim * 2,
                num_layers=preset.text_layers,
                num_heads=preset.text_heads,
                feed_forward_proj="gated-gelu",
                is_encoder_decoder=False,
                use_cache=False,
            )
        )
    with seeded(preset.seed + 1):
        transformer = PixArtTransformer2DModel(
            num_attention_heads=preset.dit_heads,
            attention_head_dim=preset.dit_head_dim,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS * 2,  # learned sigma, as in PixArt
            num_layers=preset.dit_layers,
            norm_num_groups=1,
            cross_attention_dim=preset.dit_heads * preset.dit_head_dim,
            sample_size=32,
            patch_size=preset.patch_size,
            caption_channels=preset.text_dim,
            use_additional_conditions=False,
        )
    with seeded(preset.seed + 2):
        blocks = len(preset.vae_channels)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=preset.vae_channels,
            layers_per_block=preset.vae_layers,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=preset.vae_groups,
            scaling_factor=0.13025,  # PixArt-Sigma's (SDXL) VAE factor
        )
    scheduler = DPMSolverMultistepScheduler(**PIXART_SCHEDULER)
    return PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def init_model(preset: str, directory: Path) -> Path:
    """Write preset ``preset`` to ``directory`` unless something is there already; return it."""
    return write_preset(PRESETS, preset, directory, build_pipeline)
