"""The gateway as real clients use it: the official OpenAI SDK and plain HTTP, against a stack
of real stage processes, and the error table in OpenAI's error shape."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import time
import urllib.error
import urllib.parse
from http.client import HTTPConnection
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import openai
import pytest
from PIL import Image
from typer.testing import CliRunner

from disagfusion import bus
from disagfusion.client import Client
from disagfusion.launcher import Launcher, binary, free_port, stop_process, wait_port
from disagfusion.protocol import JobSpec, StageTask, WORK_STREAM, consumer_name, pack, work_subject
from disagfusion_cli import app

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def openai_error(body: bytes) -> dict:
    """The ``error`` object of an answer, checked to have exactly OpenAI's four fields."""
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def test_sdk_images_are_the_clis_images_for_the_same_seeds(sdk: openai.OpenAI, gateway_stack: Launcher,
                                                          tmp_path: Path) -> None:
    answer = sdk.images.generate(model="tiny", prompt="a red fox in snow", size="64x64", n=2)
    pngs = [base64.b64decode(image.b64_json) for image in answer.data]
    assert len(pngs) == 2 and pngs[0] != pngs[1]  # seeds 0 and 1, JobSpec's default seed and the next
    for seed, png in enumerate(pngs):
        out = tmp_path / f"cli-{seed}.png"
        done = CliRunner().invoke(app, ["generate", "a red fox in snow", "--size", "64x64", "--seed", str(seed),
                                        "-o", str(out), "--data-dir", str(gateway_stack.data_dir)])
        assert done.exit_code == 0, done.output
        assert out.read_bytes() == png, f"seed {seed}: the gateway's PNG differs from disagfusion generate's"
    assert np.asarray(Image.open(io.BytesIO(pngs[0]))).shape == (64, 64, 3)


def test_concurrent_requests_each_get_their_own_images(sdk: openai.OpenAI) -> None:
    def generate(seed: int) -> list[bytes]:
        answer = sdk.images.generate(model="tiny", prompt="a crowd", size="64x64", n=2,
                                     extra_body={"seed": seed, "num_inference_steps": 2})
        return [base64.b64decode(image.b64_json) for image in answer.data]

    with ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(generate, [100, 102, 104, 106]))
    pngs = [png for batch in batches for png in batch]
    assert len(set(pngs)) == 8  # seeds 100..107, each once
    assert generate(103)[0] == batches[1][1]  # seed 103 is the second image of the seed-102 request


async def test_extensions_url_and_webp(sdk: openai.OpenAI, gateway_stack: Launcher) -> None:
    answer = sdk.images.generate(model="tiny", prompt="a lighthouse", size="96x64", response_format="url",
                                 output_format="webp", extra_body={"num_inference_steps": 3, "seed": 42,
                                                                   "guidance_scale": 1.0, "negative_prompt": "fog"})
    [image] = answer.data
    status, webp = http("GET", image.url)
    assert status == 200 and Image.open(io.BytesIO(webp)).format == "WEBP"
    spec = JobSpec(prompt="a lighthouse", width=96, height=64, steps=3, seed=42, guidance=1.0,
                   negative_prompt="fog", output_format="webp")
    async with Client(gateway_stack.client_settings()) as client:
        assert await client.output(await client.generate(spec, timeout=60)) == webp
    status, job = http("GET", image.url.removesuffix("/content"))
    job = json.loads(job)
    assert status == 200 and job["status"] == "completed" and job["content_type"] == "image/webp"
    assert set(job["timings"]) == {"encode", "denoise", "decode"}


async def test_any_job_by_id_also_one_published_straight_to_nats(gateway_url: str, gateway_stack: Launcher) -> None:
    spec = JobSpec(prompt="batch pipeline", width=64, height=64, steps=2)
    async with Client(gateway_stack.client_settings()) as client:
        result = await client.generate(spec, timeout=60)
        png = await client.output(result)
    status, job = http("GET", f"{gateway_url}/v1/jobs/{spec.job_id}")
    assert status == 200 and json.loads(job)["status"] == "completed"
    assert http("GET", f"{gateway_url}/v1/jobs/{spec.job_id}/content") == (200, png)


def test_models_are_the_ones_every_stage_serves(sdk: openai.OpenAI) -> None:
    assert sorted(model.id for model in sdk.models.list()) == ["emulated-video", "tiny"]
    assert sdk.models.retrieve("tiny").id == "tiny"


def test_a_video_round_trips_through_the_sdk(sdk: openai.OpenAI) -> None:
    video = sdk.videos.create(model="emulated-video", prompt="a harbour at dawn", size="64x32",
                              extra_body={"frames": 9, "fps": 8, "num_inference_steps": 2, "guidance_scale": 1.0})
    assert video.object == "video" and video.status in ("queued", "in_progress") and video.progress < 100
    seen = [video.progress]
    deadline = time.monotonic() + 60
    while video.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        video = sdk.videos.retrieve(video.id)
        seen.append(video.progress)
    assert video.status == "completed", video.error
    assert seen == sorted(seen) and seen[-1] == 100
    assert (video.size, video.seconds) == ("64x32", "1.125")  # 9 frames at 8 fps
    mp4 = sdk.videos.download_content(video.id).content
    with av.open(io.BytesIO(mp4)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 64, 3)


def test_a_video_job_a_stage_refuses_fails_with_the_param(sdk: openai.OpenAI) -> None:
    video = sdk.videos.create(model="emulated-video", prompt="x", size="64x32",
                              extra_body={"frames": 8, "num_inference_steps": 2})  # not 4k + 1
    deadline = time.monotonic() + 30
    while video.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        video = sdk.videos.retrieve(video.id)
    assert video.status == "failed" and video.error.code == "frames"
    with pytest.raises(openai.ConflictError):
        sdk.videos.download_content(video.id)


# ---------------------------------------------------------------------------------- the error table


@pytest.mark.parametrize(
    ("arguments", "param"),
    [
        ({"n": 11}, "n"),
        ({"size": "64"}, "size"),
        ({"size": "68x64"}, "size"),  # refused by the stage that loads the model, not the gateway
        ({"response_format": "bmp"}, "response_format"),
        ({"output_format": "jpeg"}, "output_format"),
        ({"extra_body": {"num_inference_steps": 0}}, "num_inference_steps"),
        ({"extra_body": {"guidance_scale": -1}}, "guidance_scale"),
        ({"extra_body": {"seed": "x"}}, "seed"),
        ({"extra_body": {"no_such_option": 1}}, "no_such_option"),
        ({"prompt": "x" * 100_000}, "prompt"),  # over DF_MAX_PROMPT_BYTES: refused before it is queued
        ({"prompt": "x" * 400}, "prompt"),  # over the tiny model's 300 tokens: refused by the encoder
    ],
)
def test_a_bad_request_is_a_400_naming_its_param(sdk: openai.OpenAI, arguments: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.images.generate(**{"model": "tiny", "prompt": "x", "size": "64x64", **arguments})
    error = raised.value
    assert error.status_code == 400 and error.param == param and error.type == "invalid_request_error", error.body


def test_a_job_past_its_deadline_is_a_504_naming_it(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as raised:
        sdk.images.generate(model="tiny", prompt="x", size="256x256",
                            extra_body={"num_inference_steps": 1000, "deadline_s": 1.0})
    error = raised.value
    assert (error.status_code, error.code, error.param) == (504, "deadline_exceeded", "deadline_s"), error.body
    assert "passed its deadline of 1 s" in error.message


def test_not_found_cases_are_404(sdk: openai.OpenAI, gateway_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.images.generate(model="no-such-model", prompt="x", size="64x64")
    assert raised.value.code == "model_not_found" and raised.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError):
        sdk.videos.retrieve("no-such-video")
    for path in ("/v1/jobs/nosuchjob", "/v1/jobs/no.such>job", "/v1/nothing-here"):
        status, body = http("GET", gateway_url + path)
        assert status == 404, path
        openai_error(body)


def test_malformed_and_oversized_bodies(gateway_url: str) -> None:
    status, body = http("POST", f"{gateway_url}/v1/images/generations", b"{not json")
    assert status == 400 and openai_error(body)["code"] == "invalid_body"
    # A body over the 1 MiB default is refused from its declared length, before it is read: the
    # client sends only the headers (sending the body too would race the server's early answer).
    address = urllib.parse.urlsplit(gateway_url)
    connection = HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.putrequest("POST", "/v1/images/generations")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(2 * 1024 * 1024))
        connection.endheaders()
        answer = connection.getresponse()
        assert answer.status == 413 and openai_error(answer.read())["code"] == "request_too_large"
    finally:
        connection.close()


async def test_api_keys_and_the_backlog_limit(gateway_stack: Launcher, start_gateway) -> None:
    nats_url = gateway_stack.client_settings().nats_url
    url = start_gateway(nats_url, DF_API_KEYS="key-one,key-two", DF_GATEWAY_MAX_BACKLOG="3")
    stranger = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        stranger.models.list()
    assert raised.value.code == "invalid_api_key"
    status, body = http("GET", f"{url}/v1/models")  # no Authorization header at all
    assert status == 401 and openai_error(body)["code"] == "invalid_api_key"
    assert http("GET", f"{url}/healthz")[0] == 200  # never asks for a key
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="key-two", max_retries=0)
    assert "tiny" in [model.id for model in sdk.models.list()]

    # Three tasks no worker takes fill the queue to its limit: a decoder consumer for a model
    # that never pulls (without a consumer, the encoder would answer them as unserved).
    parked = "gateway-backlog-test"
    async with Client(gateway_stack.client_settings()) as client:
        await bus.ensure_consumer(client.bus.js, "decode", parked, ack_wait_s=30)
        for i in range(3):
            task = StageTask(job=JobSpec(prompt="parked", model=parked), stage="decode")
            await client.bus.js.publish(work_subject("decode", parked), pack(task))
        try:
            with pytest.raises(openai.RateLimitError) as raised:
                sdk.images.generate(model="tiny", prompt="x", size="64x64")
            assert raised.value.code == "queue_full"
        finally:
            await client.bus.js.purge_stream(WORK_STREAM, subject=work_subject("decode", parked))
            await client.bus.js.delete_consumer(WORK_STREAM, consumer_name("decode", parked))
    answer = sdk.images.generate(model="tiny", prompt="x", size="64x64", extra_body={"num_inference_steps": 2})
    assert len(answer.data) == 1


def test_503_while_nats_is_away_and_serving_once_it_is_back(start_gateway, tmp_path: Path) -> None:
    port = free_port()
    url = start_gateway(f"nats://127.0.0.1:{port}")
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    status, body = http("GET", f"{url}/healthz")
    assert status == 503 and openai_error(body)["code"] == "service_unavailable"
    with pytest.raises(openai.InternalServerError) as raised:
        sdk.images.generate(model="tiny", prompt="x", size="64x64")
    assert raised.value.status_code == 503

    command = [binary("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")]
    nats = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, nats, "nats-server")
        deadline = time.monotonic() + 15
        while http("GET", f"{url}/healthz")[0] != 200:
            assert time.monotonic() < deadline, "the gateway did not connect once NATS was up"
            time.sleep(0.2)
        assert sdk.models.list().data == []  # connected: no stage serves anything on this NATS
    finally:
        stop_process(nats)
    with pytest.raises(openai.InternalServerError) as raised:
        sdk.models.list()
    assert raised.value.status_code == 503
