from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from diffusers import PixArtSigmaPipeline

from disagfusion.models.presets import init_model


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {str(f.relative_to(directory)): f.read_bytes() for f in sorted(directory.rglob("*")) if f.is_file()}


def test_tiny_is_a_standard_pixart_sigma_directory(tiny_dir: Path) -> None:
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer"] == ["transformers", "ByT5Tokenizer"]
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    pipe = PixArtSigmaPipeline.from_pretrained(tiny_dir)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.transformer.config.caption_channels == pipe.text_encoder.config.d_model


def test_presets_differ_in_weights(tmp_path: Path) -> None:
    tiny = file_bytes(init_model("tiny", tmp_path / "tiny"))
    small = file_bytes(init_model("small", tmp_path / "small"))
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert len(small[name]) > 10 * len(tiny[name])


def test_concurrent_inits_of_one_directory_all_succeed(tiny_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: init_model("tiny", target), range(4)))
    assert results == [target] * 4
    assert file_bytes(target) == file_bytes(tiny_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temporary copies left behind


def test_an_existing_directory_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    init_model("tiny", target)
    assert [p.name for p in target.iterdir()] == ["mine.txt"]


def test_unknown_preset_names_the_presets(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="tiny"):
        init_model("huge", tmp_path / "huge")
    assert not (tmp_path / "huge").exists()
