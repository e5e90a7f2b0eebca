"""Full-size architectures with random weights, written as diffusers model directories: what the
GPU check (bench/gpu/run.sh) times. A stage's time does not depend on its weights' values, so
these give the real stage times of the released models on a device, without their checkpoints
(there is no internet on the device machine).

    PYTHONPATH=$PWD python bench/gpu/full_size.py --models-dir DIR [--device cuda] [--tiny]

Writes ``DIR/wan2_1-t2v-1_3b-random`` and ``DIR/sd3_5-medium-random`` (bfloat16 safetensors, about
14 and 16 GB), built on ``--device`` (initialising 20 billion parameters takes seconds on a GPU,
minutes on a CPU). ``--tiny`` keeps every class and shrinks every width and depth: the same code
path in a few seconds on a CPU, which tests/bench runs.

The architectures are the released configs:
- Wan 2.1 T2V 1.3B (Wan-AI/Wan2.1-T2V-1.3B-Diffusers; the Wan team's ``wan_t2v_1_3B`` config):
  DiT dim 1536 (12 heads × 128), FFN 8960, 30 layers, patch (1, 2, 2); UMT5-XXL encoder (d_model
  4096, 24 layers, 64 heads, d_ff 10240, vocabulary 256384); the Wan 2.1 VAE (``AutoencoderKLWan``
  defaults: base 96, multipliers 1, 2, 4, 4).
- Stable Diffusion 3.5 Medium (stabilityai/stable-diffusion-3.5-medium): MMDiT-X 24 layers of 24 × 64,
  dual attention in layers 0-12, joint dim 4096, caption projection 1536, pooled 2048, position
  embedding 384; CLIP-L (768 wide, 12 layers), OpenCLIP bigG (1280 wide, 32 layers), T5-XXL (d_model
  4096, 24 layers, 64 heads, d_ff 10240, vocabulary 32128); the SD3 VAE (128, 256, 512, 512).
The tokenizers are the presets' own (disagfusion.models.tokenizers): their ids stay inside the
released vocabularies, whose embedding tables are built at full size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from disagfusion.models.sd3 import SD3_SCHEDULER, SD3_VAE
from disagfusion.models.tokenizers import clip_tokenizer, t5_tokenizer
from disagfusion.models.wan import WAN_SCHEDULER

T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
"""T5-XXL's and UMT5-XXL's encoder (google/t5-v1_1-xxl, google/umt5-xxl)."""
T5_TINY = dict(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)


def t5_config(size: dict[str, int], vocab_size: int, umt5: bool) -> T5Config | UMT5Config:
    config = UMT5Config if umt5 else T5Config
    return config(vocab_size=vocab_size, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, **size)


def wan(tiny: bool) -> WanPipeline:
    tokenizer = t5_tokenizer()
    text = T5_TINY if tiny else T5_XXL
    text_encoder = UMT5EncoderModel(t5_config(text, len(tokenizer) if tiny else 256384, umt5=True))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2 if tiny else 12, attention_head_dim=12 if tiny else 128,
        in_channels=16, out_channels=16, text_dim=text["d_model"], freq_dim=256, ffn_dim=32 if tiny else 8960,
        num_layers=1 if tiny else 30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        rope_max_seq_len=32 if tiny else 1024,
    )
    vae = AutoencoderKLWan(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1) if tiny else AutoencoderKLWan()
    with torch.device("cpu"):  # schedulers keep their tables on the CPU
        scheduler = UniPCMultistepScheduler(**WAN_SCHEDULER)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=scheduler)


def clip(tokenizer, width: int, layers: int, heads: int, act: str) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, projection_dim=width,
        num_hidden_layers=layers, num_attention_heads=heads, hidden_act=act, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def sd35_medium(tiny: bool) -> StableDiffusion3Pipeline:
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer()
    clip_l, clip_g = ((16, 2, 2), (16, 2, 2)) if tiny else ((768, 12, 12), (1280, 32, 20))
    text = T5_TINY if tiny else T5_XXL
    heads, head_dim = (2, 8) if tiny else (24, 64)
    transformer = SD3Transformer2DModel(
        sample_size=32 if tiny else 128, patch_size=2, in_channels=16, out_channels=16,
        num_layers=2 if tiny else 24, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=text["d_model"], caption_projection_dim=heads * head_dim,
        pooled_projection_dim=clip_l[0] + clip_g[0], pos_embed_max_size=96 if tiny else 384,
        dual_attention_layers=(0,) if tiny else tuple(range(13)), qk_norm="rms_norm",
    )
    channels = (8, 8, 8, 8) if tiny else (128, 256, 512, 512)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels, layers_per_block=1 if tiny else 2, latent_channels=16,
        norm_num_groups=4 if tiny else 32, sample_size=64 if tiny else 1024, **SD3_VAE,
    )
    with torch.device("cpu"):
        scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=clip(tokenizer, *clip_l, "quick_gelu"), tokenizer=tokenizer,
        text_encoder_2=clip(tokenizer_2, *clip_g, "gelu"), tokenizer_2=tokenizer_2,
        text_encoder_3=T5EncoderModel(t5_config(text, len(tokenizer_3) if tiny else 32128, umt5=False)),
        tokenizer_3=tokenizer_3,
    )


MODELS = {"wan2_1-t2v-1_3b-random": wan, "sd3_5-medium-random": sd35_medium}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda: seconds)")
    parser.add_argument("--tiny", action="store_true", help="every width and depth shrunk: the same code path, fast on a CPU")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, build in MODELS.items():
        directory = args.models_dir / name
        if (directory / "model_index.json").exists():
            print(f"{name}: already at {directory}", flush=True)
            continue
        start = time.perf_counter()
        with torch.device(args.device):
            pipe = build(args.tiny)
        pipe.to(torch.bfloat16)
        built = time.perf_counter() - start
        pipe.save_pretrained(directory)
        parameters = sum(p.numel() for part in pipe.components.values() if isinstance(part, torch.nn.Module)
                         for p in part.parameters())
        rows.append({"model": name, "parameters": parameters, "build_s": round(built, 1),
                     "write_s": round(time.perf_counter() - start - built, 1), "tiny": args.tiny})
        print(f"{name}: {parameters / 1e9:.2f} B parameters, built in {built:.1f} s on {args.device}, "
              f"written to {directory} in {rows[-1]['write_s']} s", flush=True)
        del pipe
    print(json.dumps({"benchmark": "full_size", "models": rows}))


if __name__ == "__main__":
    main()
