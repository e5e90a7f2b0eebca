"""The hybrid controller's decisions on scripted situations, tick by tick."""

from __future__ import annotations

from disagfusion.protocol import STAGES
from services.scheduler.config import SchedulerSettings
from services.scheduler.controller import Controller, FleetState
from services.scheduler.feedback import Observation, StageView
from services.scheduler.pool import Allocation, parse_pool, per_stage

POOL = parse_pool("slot:12")


def observe(t: float, incoming: dict[str, float] | None = None, queued: dict[str, dict[str, float]] | None = None) -> Observation:
    """``incoming``: reference seconds of work per second per stage; ``queued``: at a stage, the
    seconds of work its queue holds for itself and later stages, all of it due in the horizon."""
    views = {}
    for stage in STAGES:
        work = (queued or {}).get(stage, {})
        views[stage] = StageView(
            stage=stage, incoming_work=(incoming or {}).get(stage, 0.0), queued_work=work, queued_due=work, pending=1 if work else 0
        )
    return Observation(t=t, stages=views)


def fleet_of(allocation: Allocation) -> FleetState:
    return FleetState(running={s: dict(allocation.get(s, {})) for s in STAGES})


def run_ticks(controller: Controller, start: Allocation, observations: list[Observation]) -> list[dict[str, int]]:
    """Each tick's decision becomes the next tick's running fleet (instant actuator)."""
    current, decisions = start, []
    for obs in observations:
        current = controller.decide(obs, fleet_of(current))
        decisions.append(per_stage(current))
    return decisions


IMAGES = {"encode": 0.6, "denoise": 9.0, "decode": 0.9}
"""Small images at about 17 jobs/s: DiT-bound."""
VIDEO = {"encode": 0.3, "denoise": 9.0, "decode": 0.35}


def test_a_burst_scales_every_stage_up_at_once(settings: SchedulerSettings) -> None:
    controller = Controller(POOL, settings.model_copy(update={"fill_pool": False}))
    start = {"encode": {"slot": 1}, "denoise": {"slot": 1}, "decode": {"slot": 1}}
    burst = observe(0.0, queued={"encode": {"encode": 180.0, "denoise": 480.0, "decode": 180.0}})
    (first,) = run_ticks(controller, start, [burst])
    # All of it waits at the encoder, yet the DiT grows in the same tick: it is DiT work already.
    assert first["denoise"] >= 6
    assert first["encode"] >= 2 and first["decode"] >= 2
    assert sum(first.values()) <= 12


def test_idle_holds_through_the_window_then_shrinks_to_the_minimum(settings: SchedulerSettings) -> None:
    controller = Controller(POOL, settings)
    start = {"encode": {"slot": 2}, "denoise": {"slot": 8}, "decode": {"slot": 2}}
    decisions = run_ticks(controller, start, [observe(t) for t in range(0, 125, 5)])
    window_ticks = int(settings.stabilisation_s / settings.tick_s)
    assert all(d == {"encode": 2, "denoise": 8, "decode": 2} for d in decisions[:window_ticks])
    assert decisions[-1] == {"encode": 1, "denoise": 1, "decode": 1}


def test_a_shift_to_video_grows_the_dit_at_once_and_shrinks_the_rest_later(settings: SchedulerSettings) -> None:
    controller = Controller(POOL, settings.model_copy(update={"fill_pool": False}))
    start = {"encode": {"slot": 1}, "denoise": {"slot": 3}, "decode": {"slot": 1}}
    ticks = [observe(t, incoming={"encode": 1.2, "denoise": 2.0, "decode": 1.5}) for t in range(0, 60, 5)]
    ticks += [observe(t, incoming=VIDEO, queued={"encode": {"encode": 5.0, "denoise": 150.0, "decode": 6.0}}) for t in range(60, 200, 5)]
    decisions = run_ticks(controller, start, ticks)
    before, first_video, last = decisions[11], decisions[12], decisions[-1]
    assert before["encode"] == 2 and before["decode"] == 2
    assert first_video["denoise"] >= 10  # up at once
    assert first_video["encode"] == 1  # the pool is short: extra encoders give way at once...
    assert last["denoise"] >= 10 and last["decode"] == 1


def test_without_pressure_a_stage_gives_way_only_after_the_window(settings: SchedulerSettings) -> None:
    controller = Controller(parse_pool("slot:40"), settings.model_copy(update={"fill_pool": False}))
    start = {"encode": {"slot": 1}, "denoise": {"slot": 1}, "decode": {"slot": 1}}
    ticks = [observe(t, incoming={"encode": 3.0, "denoise": 9.0, "decode": 3.0}) for t in range(0, 30, 5)]
    ticks += [observe(t, incoming={"encode": 0.5, "denoise": 9.0, "decode": 0.5}) for t in range(30, 150, 5)]
    decisions = run_ticks(controller, start, ticks)
    high = decisions[5]["encode"]
    assert high == 4
    # The lower want starts at t=30; the window is 60 s: held through t=85, released from t=95.
    held = [d["encode"] for t, d in zip(range(0, 150, 5), decisions) if 30 <= t < 90]
    assert held == [high] * len(held)
    assert decisions[-1]["encode"] == 1


def test_steady_load_does_not_flap(settings: SchedulerSettings) -> None:
    controller = Controller(POOL, settings.model_copy(update={"fill_pool": False}))
    start = {"encode": {"slot": 1}, "denoise": {"slot": 1}, "decode": {"slot": 1}}
    # Steady load with noise in the measured rates, the kind a real arrival average shows.
    noise = [1.0, 1.08, 0.93, 1.05, 0.97, 1.1, 0.9, 1.02] * 20
    ticks = [observe(5.0 * k, incoming={s: v * noise[k] for s, v in IMAGES.items()}) for k in range(len(noise))]
    decisions = run_ticks(controller, start, ticks)[4:]
    for stage in STAGES:
        counts = [d[stage] for d in decisions]
        changes = sum(1 for a, b in zip(counts, counts[1:]) if a != b)
        assert changes <= 1, (stage, counts)


def test_a_pin_wins_until_released(settings: SchedulerSettings) -> None:
    controller = Controller(POOL, settings)
    start = {"encode": {"slot": 1}, "denoise": {"slot": 10}, "decode": {"slot": 1}}
    busy = observe(0.0, incoming=IMAGES, queued={"denoise": {"denoise": 600.0, "decode": 30.0}})
    pinned = controller.decide(busy, fleet_of(start), pins={"denoise": 2})
    assert per_stage(pinned)["denoise"] == 2
    released = controller.decide(observe(5.0, incoming=IMAGES, queued={"denoise": {"denoise": 600.0, "decode": 30.0}}), fleet_of(pinned))
    assert per_stage(released)["denoise"] >= 9


def test_startup_time_is_planned_for(settings: SchedulerSettings) -> None:
    controller = Controller(parse_pool("slot:64"), settings.model_copy(update={"fill_pool": False}))
    start = {"encode": {"slot": 1}, "denoise": {"slot": 1}, "decode": {"slot": 1}}
    obs = observe(0.0, incoming={"encode": 0.5, "denoise": 8.0, "decode": 0.5})
    now_ready = controller.need(obs, fleet_of(start))["denoise"]
    # With instances that take longer to start, the DiT piles up more work meanwhile: ask for more.
    slow = Controller(parse_pool("slot:64"), settings.model_copy(update={"fill_pool": False, "startup_s": {"denoise": 120.0}}))
    assert slow.need(obs, fleet_of(start))["denoise"] > now_ready + 5
    # Instances already starting count: only their remaining start-up is planned for.
    starting = FleetState(running=start, starting={"denoise": {"slot": 9}}, ready_in={"denoise": 2.0})
    assert slow.need(obs, starting)["denoise"] < now_ready + 1


def test_heterogeneous_pool_keeps_big_gpus_for_the_dit(settings: SchedulerSettings) -> None:
    pool = parse_pool("h100:8,l4:16")
    controller = Controller(pool, settings)
    decided = controller.place({"encode": 1.0, "denoise": 6.0, "decode": 1.0}, {})
    assert set(decided["encode"]) == {"l4"} and set(decided["decode"]) == {"l4"}
    assert decided["denoise"] == {"h100": 8}


def test_near_tied_needs_do_not_move_an_instance_back_and_forth(settings: SchedulerSettings) -> None:
    # A full pool whose arrival estimates wobble around the point where one slot is as well
    # spent on the encoder as on the DiT: each tick's fresh placement alternates.
    wobble = [{"encode": 1.02, "denoise": 7.65, "decode": 1.3}, {"encode": 1.02, "denoise": 8.3, "decode": 1.3}] * 10
    ticks = [observe(float(t), incoming=incoming) for t, incoming in enumerate(wobble)]
    start = {"encode": {"slot": 2}, "denoise": {"slot": 8}, "decode": {"slot": 2}}
    eager = run_ticks(Controller(POOL, settings.model_copy(update={"switch_margin": 0.0, "stabilisation_s": 0.0})), start, ticks)
    calm = run_ticks(Controller(POOL, settings.model_copy(update={"switch_margin": 0.05, "stabilisation_s": 0.0})), start, ticks)
    assert len({d["encode"] for d in eager}) == 2  # without hysteresis it flips
    assert len({d["encode"] for d in calm}) == 1, calm


def test_hysteresis_compares_with_the_fleet_it_decided(settings: SchedulerSettings) -> None:
    # The first tick sees no arrivals yet: its raw placement is the minimums, while the decision
    # (held by stabilisation) is the full fleet found running. A near-tie placement next must be
    # weighed against that fleet, not against the minimums that never ran.
    start = {"encode": {"slot": 2}, "denoise": {"slot": 8}, "decode": {"slot": 2}}
    near_tie = {"encode": 1.02, "denoise": 8.3, "decode": 1.3}
    ticks = [observe(0.0), observe(1.0, incoming=near_tie), observe(2.0, incoming=near_tie)]
    calm = Controller(POOL, settings.model_copy(update={"switch_margin": 0.05, "stabilisation_s": 0.0}))
    assert run_ticks(calm, start, ticks) == [{"encode": 2, "denoise": 8, "decode": 2}] * 3
    eager = Controller(POOL, settings.model_copy(update={"switch_margin": 0.0, "stabilisation_s": 0.0}))
    assert run_ticks(eager, start, ticks)[-1] != {"encode": 2, "denoise": 8, "decode": 2}
