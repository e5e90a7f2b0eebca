"""Resumable denoising at the model level: a run stopped after step k and resumed from its
checkpoint (through raw bytes, as through a transport) ends bitwise equal to an uninterrupted
run, for PixArt's multistep DPM-Solver++ and SD3's flow-matching Euler, in a batch and alone;
only deterministic schedulers and opted-in families resume."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from disagfusion.models import resume
from disagfusion.models.base import Tensors
from disagfusion.protocol import JobSpec
from tests.models.split import handoff


class Stop(Exception):
    pass


def stopped_at(denoiser, specs: list[JobSpec], inputs: list[Tensors], step: int) -> list[Tensors]:
    """The checkpoint of each job after ``step``, from a run stopped there."""
    caught: list[list[Tensors]] = []

    def on_step(done: int, total: int) -> None:
        if done == step:
            caught.append(resume.current().capture())
            raise Stop

    with pytest.raises(Stop):
        denoiser.run(specs, inputs, on_step)
    return [handoff(state) for state in caught[0]]


@pytest.mark.parametrize(("model", "size", "steps", "at"), [("tiny", 64, 12, 9), ("sd3-tiny", 64, 8, 5)])
def test_a_resumed_run_is_bitwise_equal_to_an_uninterrupted_one(stages, model: str, size: int, steps: int, at: int) -> None:
    loaded = stages(model)
    denoiser = loaded["denoise"]
    assert denoiser.resumable
    specs = [JobSpec(model=model, prompt=f"a lighthouse {i}", negative_prompt="blurry", seed=i, steps=steps,
                     height=size, width=size, guidance=4.5) for i in range(2)]
    inputs = [handoff(t) for t in loaded["encode"].run(specs, [{} for _ in specs])]
    uninterrupted = denoiser.run(specs, inputs)
    states = stopped_at(denoiser, specs, inputs, at)
    assert [resume.start_step(state) for state in states] == [at, at]

    reported: list[tuple[int, int]] = []
    resumed = denoiser.run(specs, [job | state for job, state in zip(inputs, states)],
                           lambda step, total: reported.append((step, total)))
    assert reported == [(step, steps) for step in range(at + 1, steps + 1)], "steps count in the whole run"
    for whole, rest in zip(uninterrupted, resumed, strict=True):
        assert torch.equal(whole["latents"], rest["latents"])

    # A job alone resumes from its own checkpoint bitwise too (the batch of one it ran in).
    [alone] = denoiser.run(specs[:1], inputs[:1])
    [state] = stopped_at(denoiser, specs[:1], inputs[:1], at)
    [rest] = denoiser.run(specs[:1], [inputs[0] | state])
    assert torch.equal(alone["latents"], rest["latents"])
    # The scheduler is the class's again, and a plain run after a resumed one starts at step 0.
    assert "step" not in vars(denoiser.pipe.scheduler)
    assert torch.equal(denoiser.run(specs[:1], inputs[:1])[0]["latents"], alone["latents"])


def test_jobs_of_a_batch_must_resume_from_one_step(stages) -> None:
    loaded = stages("tiny")
    specs = [JobSpec(prompt=f"p{i}", seed=i, steps=6) for i in range(2)]
    inputs = [handoff(t) for t in loaded["encode"].run(specs, [{}, {}])]
    states = stopped_at(loaded["denoise"], specs, inputs, 3)
    with pytest.raises(ValueError, match="one step"):
        loaded["denoise"].run(specs, [inputs[0] | states[0], inputs[1]])


def test_only_deterministic_schedulers_resume() -> None:
    assert resume.supported(DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"))
    # An SDE solver draws noise each step: its generators' states are not checkpointed.
    assert not resume.supported(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"))
