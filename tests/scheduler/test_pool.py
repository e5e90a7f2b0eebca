from __future__ import annotations

import pytest

from services.scheduler.config import SchedulerSettings
from services.scheduler.pool import deployment_replicas, fit_to_pool, parse_pool


def test_pool_syntax_with_known_classes_and_overrides() -> None:
    pool = parse_pool("h100:64,l4:256:encode+decode:0.25")
    h100, l4 = pool.classes
    assert (h100.count, h100.speed, h100.speed_for("denoise")) == (64, 0.85, 0.85)
    assert l4.speed_for("denoise") == 0.0 and l4.speed_for("encode") == 0.25
    assert pool.total == 320
    with pytest.raises(ValueError):
        parse_pool("h100:4:render")


def test_deployment_names_cover_every_allowed_stage_and_class() -> None:
    pool = parse_pool("h100:4,l4:4")
    replicas = deployment_replicas({"denoise": {"h100": 3}, "encode": {"l4": 2}}, pool, "{service}-{device}")
    assert replicas == {"encoder-h100": 0, "encoder-l4": 2, "dit-h100": 3, "decoder-h100": 0, "decoder-l4": 0}


def test_fit_to_pool_trims_in_proportion() -> None:
    fitted = fit_to_pool({"encode": 10, "denoise": 20, "decode": 10}, parse_pool("slot:8"))
    assert sum(sum(by.values()) for by in fitted.values()) <= 8
    assert fitted["denoise"]["slot"] == 4


def test_settings_read_df_sched_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DF_SCHED_POOL", "h100:2")
    monkeypatch.setenv("DF_SCHED_MAX_INSTANCES", '{"denoise": 5}')
    settings = SchedulerSettings()
    assert settings.pool == "h100:2" and settings.max_instances == {"denoise": 5}
