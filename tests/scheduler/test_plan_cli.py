"""`disagfusion plan`: the scheduler's planner behind the command line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from disagfusion_cli import app
from services.scheduler.trace import write_trace

from .conftest import small_image, steady, video


def test_plan_prints_a_deployment_and_expectations(tmp_path) -> None:
    trace = tmp_path / "t.jsonl"
    write_trace(trace, steady(small_image, 4.0, 0.0, 30.0, "images") + steady(video, 0.05, 30.0, 90.0, "video", offset=100))
    result = CliRunner().invoke(app, ["plan", "--trace", str(trace), "--pool", "h100:4,l4:6"])
    assert result.exit_code == 0, result.output
    assert "What it would deploy" in result.output and "video" in result.output
    as_json = CliRunner().invoke(app, ["plan", "--trace", str(trace), "--pool", "h100:4,l4:6", "--json"])
    report = json.loads(as_json.output)
    assert report["overall"]["jobs"] == report["overall"]["completed"] == 120 + 3


def test_a_bad_pool_is_an_error(tmp_path) -> None:
    trace = tmp_path / "t.jsonl"
    write_trace(trace, steady(small_image, 1.0, 0.0, 3.0))
    result = CliRunner().invoke(app, ["plan", "--trace", str(trace), "--pool", "h100"])
    assert result.exit_code != 0
