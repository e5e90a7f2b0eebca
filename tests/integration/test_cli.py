"""The disagfusion command against a running embedded stack, as a user types it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from disagfusion_cli import app

runner = CliRunner()


def said(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def test_generate_writes_the_image(stack, tmp_path: Path) -> None:
    out = tmp_path / "fox.png"
    result = runner.invoke(app, ["generate", "a red fox", "-o", str(out), "--steps", "3", "--size", "96x64",
                                 "--data-dir", str(stack.data_dir)])
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(out)).shape == (64, 96, 3)


def test_generate_reports_a_bad_size_before_submitting(stack, tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "x", "--size", "64", "--data-dir", str(stack.data_dir)])
    assert result.exit_code == 1 and "--size must look like 256x256" in said(result)


def test_generate_reports_the_service_error(stack, tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "x", "--size", "68x64", "-o", str(tmp_path / "x.png"),
                                 "--data-dir", str(stack.data_dir)])
    assert result.exit_code == 1 and "width: 68 is not a multiple of 8" in said(result)
    assert not (tmp_path / "x.png").exists()


def test_generate_and_submit_refuse_a_job_over_a_limit_before_queueing_it(stack, tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "x" * 100_000, "--data-dir", str(stack.data_dir)])
    assert result.exit_code == 1 and "refused: prompt: 100000 bytes" in said(result), said(result)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "fine", "steps": 2, "width": 64, "height": 64}\n'
                    '{"prompt": "huge", "steps": 1000, "width": 8192, "height": 8192}\n')
    result = runner.invoke(app, ["submit", str(jobs), "--out", str(tmp_path / "out"), "--data-dir", str(stack.data_dir)])
    assert result.exit_code == 1 and "DF_MAX_JOB_MPX_STEPS" in said(result), said(result)


def test_submit_writes_images_and_a_manifest(stack, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        '{"prompt": "one", "steps": 2, "width": 64, "height": 64}\n'
        "# a comment\n\n"
        '{"prompt": "two", "steps": 3, "width": 64, "height": 128, "guidance": 1.0}\n'
        '{"prompt": "bad", "steps": 2, "width": 60, "height": 64}\n'
    )
    out = tmp_path / "out"
    result = runner.invoke(app, ["submit", str(jobs), "--out", str(out), "--data-dir", str(stack.data_dir)])
    assert result.exit_code == 0, result.output
    assert "2/3 images" in said(result) and "latency p50" in said(result)
    manifest = json.loads((out / "manifest.json").read_text())
    ok = [job for job in manifest["jobs"] if job["status"] == "ok"]
    assert [job["prompt"] for job in ok] == ["one", "two"]
    for job in ok:
        assert (out / job["file"]).exists()
        assert set(job["timings"]) == {"encode", "denoise", "decode"}
    [failed] = [job for job in manifest["jobs"] if job["status"] == "error"]
    assert failed["field"] == "width"


def test_submit_rejects_an_invalid_line_with_its_number(stack, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "fine"}\n{"prompt": "x", "steps": 0}\n')
    result = runner.invoke(app, ["submit", str(jobs), "--data-dir", str(stack.data_dir)])
    assert result.exit_code == 1 and "jobs.jsonl:2: steps" in said(result)


def test_scale_up_and_down_locally_and_status(stack) -> None:
    data_dir = ["--data-dir", str(stack.data_dir)]
    result = runner.invoke(app, ["scale", "dit=2", *data_dir])
    assert result.exit_code == 0, result.output
    assert stack.running()["dit"] == 2
    status = runner.invoke(app, ["status", *data_dir])
    assert status.exit_code == 0 and "local deployment" in said(status) and "denoise" in said(status)
    result = runner.invoke(app, ["scale", "dit=1", *data_dir])
    assert result.exit_code == 0, result.output
    assert stack.running()["dit"] == 1


def test_scale_names_unknown_services(stack) -> None:
    result = runner.invoke(app, ["scale", "gpu=2", "--data-dir", str(stack.data_dir)])
    assert result.exit_code == 1 and "unknown service 'gpu'" in said(result)
