from __future__ import annotations

from dataclasses import dataclass

import pytest

from disagfusion.cost import CostProfile, sampled
from disagfusion.protocol import TimingSample
from services.scheduler.feedback import Feedback, StageView
from services.scheduler.predictor import Predictor

from .conftest import small_image, video


@dataclass
class Info:
    """Shaped like nats-py's ConsumerInfo, as far as the scheduler reads it."""

    num_pending: int
    num_ack_pending: int
    num_waiting: int


def test_jobs_queued_upstream_are_future_work_for_every_later_stage(profiles: list[CostProfile]) -> None:
    predictor = Predictor(profiles)
    feedback = Feedback(predictor)
    for n in range(4):
        feedback.on_enqueue("encode", video(n))
    obs = feedback.snapshot(0.0, {"encode": 1, "denoise": 1, "decode": 1})
    encode, denoise, decode = predictor.job_costs(video(0))
    assert obs.stages["encode"].pending == 4
    assert obs.stages["denoise"].backlog == 0
    # Nothing waits at the DiT yet, but four videos' DiT work is already on its way.
    assert obs.future_work("denoise") == pytest.approx(4 * denoise)
    assert obs.future_work("decode") == pytest.approx(4 * decode)
    assert obs.future_work("encode") == pytest.approx(4 * encode)


def test_a_sample_moves_work_downstream(profiles: list[CostProfile]) -> None:
    predictor = Predictor(profiles)
    feedback = Feedback(predictor)
    jobs = [video(n) for n in range(3)]
    for job in jobs:
        feedback.on_enqueue("encode", job)
    feedback.on_sample(TimingSample(stage="encode", model=jobs[0].model, worker="w", batch=1, seconds=2.0, jobs=[sampled(jobs[0])]))
    feedback.on_enqueue("denoise", jobs[0])
    obs = feedback.snapshot(0.0, {})
    _, denoise, _ = predictor.job_costs(jobs[0])
    assert obs.stages["encode"].pending == 2 and obs.stages["denoise"].pending == 1
    assert obs.future_work("denoise") == pytest.approx(3 * denoise)
    assert obs.stages["encode"].measured_s == pytest.approx(2.0)


def test_jetstream_counts_correct_what_the_tracker_missed(profiles: list[CostProfile]) -> None:
    predictor = Predictor(profiles)
    feedback = Feedback(predictor)
    feedback.on_enqueue("encode", video(0))
    # The scheduler restarted: JetStream holds 6 tasks at the encoder, the tracker saw one.
    feedback.on_consumer_info("encode", Info(num_pending=4, num_ack_pending=2, num_waiting=0))
    feedback.on_consumer_info("denoise", Info(num_pending=0, num_ack_pending=0, num_waiting=3))
    obs = feedback.snapshot(0.0, {"encode": 2, "denoise": 3, "decode": 1})
    _, denoise, _ = predictor.job_costs(video(0))
    assert obs.stages["encode"].backlog == 6 and obs.stages["encode"].in_flight == 2
    assert obs.future_work("denoise") == pytest.approx(6 * denoise)
    assert obs.stages["encode"].utilisation == 1.0
    assert obs.stages["denoise"].utilisation == 0.0  # three idle pulls, three instances


def test_arrival_rate_and_incoming_work(profiles: list[CostProfile]) -> None:
    predictor = Predictor(profiles)
    feedback = Feedback(predictor, tau_s=1e-6)  # no smoothing: the last interval's rate
    feedback.snapshot(0.0, {})
    for n in range(10):
        feedback.on_enqueue("encode", video(n))
    obs = feedback.snapshot(5.0, {})
    assert obs.stages["encode"].arrival_rate == pytest.approx(2.0)
    assert obs.stages["denoise"].incoming_work == pytest.approx(2.0 * predictor.job_costs(video(0))[1])


def test_long_jobs_are_due_only_in_proportion_to_their_latency_budget(profiles: list[CostProfile]) -> None:
    predictor = Predictor(profiles)
    feedback = Feedback(predictor, horizon_s=60.0, latency_budget=5.0)
    feedback.on_enqueue("encode", video(0))
    feedback.on_enqueue("encode", small_image(0))
    obs = feedback.snapshot(0.0, {})
    video_costs, image_costs = predictor.job_costs(video(0)), predictor.job_costs(small_image(0))
    # The video may take 5x its ~81 s: only 60 / (5 * 81) of its DiT work is due within 60 s;
    # the image's budget is shorter than the horizon, so all of it is due.
    share = 60.0 / (5.0 * sum(video_costs))
    assert obs.due_work("denoise") == pytest.approx(video_costs[1] * share + image_costs[1])
    assert obs.future_work("denoise") == pytest.approx(video_costs[1] + image_costs[1])


def test_utilisation_counts_a_stage_without_work_as_idle_between_pulls() -> None:
    """Found on the real compose stack: idle workers between two pull requests hold no waiting
    pull, which read as fully busy and made the threshold policy grow an idle stage."""
    assert StageView("encode", running=2, waiting=0).utilisation == 0.0
    assert StageView("encode", running=2, waiting=0, in_flight=2).utilisation == 1.0
    assert StageView("encode", running=2, waiting=1, in_flight=1).utilisation == 0.5
    assert StageView("encode", running=0, pending=3).utilisation == 0.0


def test_work_a_stage_holds_is_not_waiting_for_more_of_it(profiles: list[CostProfile]) -> None:
    predictor = Predictor(profiles)
    feedback = Feedback(predictor)
    for n in range(8):
        feedback.on_enqueue("encode", video(n))
    for n in range(4):  # four left the encoder and sit at the DiT: one held, three waiting
        feedback.on_sample(TimingSample(stage="encode", model=video(n).model, worker="w", batch=1, seconds=1.0, jobs=[sampled(video(n))]))
        feedback.on_enqueue("denoise", video(n))
    feedback.on_consumer_info("encode", Info(num_pending=2, num_ack_pending=2, num_waiting=0))
    feedback.on_consumer_info("denoise", Info(num_pending=3, num_ack_pending=1, num_waiting=0))
    obs = feedback.snapshot(0.0, {"encode": 2, "denoise": 1, "decode": 1})
    encode, denoise, decode = predictor.job_costs(video(0))
    # The DiT's own held job is being served; the encoder's held jobs still wait for the DiT.
    assert obs.future_work("denoise") == pytest.approx(8 * denoise)
    assert obs.waiting_work("denoise", due=False) == pytest.approx(7 * denoise)
    assert obs.waiting_work("encode", due=False) == pytest.approx(2 * encode)
    assert obs.waiting_work("decode", due=False) == pytest.approx(8 * decode)
