from __future__ import annotations

from disagfusion.protocol import STAGES
from services.scheduler.config import SchedulerSettings
from services.scheduler.controller import FleetState
from services.scheduler.feedback import Observation, StageView
from services.scheduler.policies import LagOnly, Scheduled, Threshold
from services.scheduler.pool import parse_pool, per_stage


def obs(t: float, **views: dict) -> Observation:
    return Observation(t=t, stages={s: StageView(stage=s, **views.get(s, {})) for s in STAGES})


def fleet(n: dict[str, int]) -> FleetState:
    return FleetState(running={s: {"slot": n[s]} for s in STAGES})


def test_lag_only_is_kedas_rule(settings: SchedulerSettings) -> None:
    policy = LagOnly(parse_pool("slot:100"), settings.model_copy(update={"lag_threshold": 10}))
    decided = policy.decide(obs(0.0, encode={"pending": 25, "in_flight": 6}, denoise={"pending": 0, "in_flight": 3}), fleet({"encode": 1, "denoise": 1, "decode": 1}))
    assert per_stage(decided) == {"encode": 4, "denoise": 1, "decode": 1}  # ceil(31/10), ceil(3/10), min 1
    # The HPA's 300 s scale-down window holds the count after the lag is gone.
    assert per_stage(policy.decide(obs(200.0), fleet({"encode": 4, "denoise": 1, "decode": 1})))["encode"] == 4
    assert per_stage(policy.decide(obs(400.0), fleet({"encode": 4, "denoise": 1, "decode": 1})))["encode"] == 1


def test_lag_only_cannot_exceed_the_pool(settings: SchedulerSettings) -> None:
    policy = LagOnly(parse_pool("slot:12"), settings)
    decided = policy.decide(obs(0.0, denoise={"pending": 500}), fleet({"encode": 1, "denoise": 1, "decode": 1}))
    assert sum(per_stage(decided).values()) <= 12


def test_threshold_rule_with_cooldown(settings: SchedulerSettings) -> None:
    policy = Threshold(parse_pool("slot:12"), settings)
    start = fleet({"encode": 2, "denoise": 2, "decode": 2})
    busy = {"running": 2, "waiting": 0, "in_flight": 2}  # busy workers hold their tasks unacked
    idle = {"running": 2, "waiting": 2}
    first = policy.decide(obs(0.0, encode={"pending": 3, **idle}, denoise=busy, decode=idle), start)
    assert per_stage(first) == {"encode": 3, "denoise": 3, "decode": 1}  # queue > 2, util > 80%, util < 20%
    assert per_stage(policy.decide(obs(20.0, denoise=busy), start))["denoise"] == 3  # cooling down
    assert per_stage(policy.decide(obs(31.0, denoise=busy), start))["denoise"] == 4


def test_scheduled_switches_at_its_times() -> None:
    a, b = {"denoise": {"slot": 3}}, {"denoise": {"slot": 5}}
    policy = Scheduled("oracle", [(0.0, a), (100.0, b)])
    assert policy.decide(obs(99.0), FleetState()) is a
    assert policy.decide(obs(100.0), FleetState()) is b
