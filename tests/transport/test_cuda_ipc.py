"""CUDA IPC handoff: the handle's wire form, the producer's lease registry and the release
channel run everywhere (real nats-server); the handoff itself needs a GPU and two processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from disagfusion.config import Settings
from disagfusion.protocol import JobSpec, StageTask, pack, unpack
from disagfusion.transport import Transports
from disagfusion.transport.cuda_ipc import CudaIpcHandle, LeaseRegistry, ReleaseChannel
from disagfusion.protocol import MissingBlobError, TensorRef
from disagfusion.transport.ref import checksum, tensor_bytes

ROOT = Path(__file__).resolve().parents[2]
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA device; this torch build or machine has none"
)

HANDLE = CudaIpcHandle(
    producer="p1", key="job.encode.prompt_embeds", device_uuid="GPU-6f1c4a2e-0000-4000-8000-000000000001",
    storage_handle=bytes(range(256))[:64], storage_size_bytes=1 << 26, storage_offset_bytes=4096,
    ref_counter_handle=b"/torch_123_456_7\xff\x00", ref_counter_offset=3, event_handle=b"\x00\x80" * 32,
    event_sync_required=True, tensor_offset=16, stride=[4096, 1],
)


def test_handle_travels_in_a_stage_task_unchanged() -> None:
    ref = TensorRef(transport="cuda_ipc", key=HANDLE.encode(), dtype="float16", shape=[300, 4096],
                    nbytes=300 * 4096 * 2, checksum="")
    assert ref.key.isascii() and "/" not in ref.key  # usable as a plain string anywhere
    task = StageTask(job=JobSpec(prompt="x"), stage="denoise", tensors={"prompt_embeds": ref})
    back = unpack(StageTask, pack(task)).tensors["prompt_embeds"]
    assert CudaIpcHandle.decode(back.key) == HANDLE
    assert CudaIpcHandle.decode(HANDLE.model_copy(update={"event_handle": None}).encode()).event_handle is None


@pytest.mark.parametrize("key", ["job.denoise.latents", "!!!", HANDLE.encode()[:-8]])
def test_a_key_that_is_not_a_handle_is_refused(key: str) -> None:
    with pytest.raises(MissingBlobError, match="not a CUDA IPC handle"):
        CudaIpcHandle.decode(key)


def test_registry_releases_by_key_and_expires_by_lease() -> None:
    now = [0.0]
    registry: LeaseRegistry[str] = LeaseRegistry(lease_s=10.0, clock=lambda: now[0])
    registry.hold("a", "A")
    registry.hold("b", "B")
    now[0] = 5.0
    registry.hold("c", "C")
    assert registry.expire() == [] and len(registry) == 3
    assert registry.release("b") == "B" and registry.release("b") is None
    now[0] = 10.0
    assert registry.expire() == ["a"]
    assert registry.get("a") is None and registry.get("c") == "C"
    now[0] = 15.0
    assert registry.expire() == ["c"] and len(registry) == 0
    assert registry.release("c") is None  # a release after the lease ran out is harmless


def test_release_reaches_the_producer_over_nats(nats_server: str) -> None:
    released: list[str] = []
    arrived = threading.Event()
    sweeps = threading.Semaphore(0)

    def on_release(key: str) -> None:
        released.append(key)
        arrived.set()

    producer = ReleaseChannel(nats_server, "producer-1", on_release, sweeps.release, sweep_every_s=0.05)
    other = ReleaseChannel(nats_server, "producer-2", lambda key: released.append(f"wrong:{key}"), lambda: None, 60)
    try:
        other.send("producer-1", "job.encode.prompt_embeds")
        assert arrived.wait(10)
        assert released == ["job.encode.prompt_embeds"]
        assert sweeps.acquire(timeout=10) and sweeps.acquire(timeout=10)  # the lease sweep runs by itself
    finally:
        other.close()
        producer.close()


def test_cpu_tensors_go_through_shm_when_cuda_ipc_is_configured(tmp_path: Path) -> None:
    transports = Transports(Settings(transport="cuda_ipc", inline_max_bytes=0, shm_dir=tmp_path))
    tensor = torch.arange(10, dtype=torch.float32)
    ref = transports.put("k", tensor)
    assert ref.transport == "shm" and torch.equal(transports.get(ref), tensor)
    transports.close()


CONSUMER = textwrap.dedent(
    """
    import sys, torch
    from disagfusion.config import Settings
    from disagfusion.transport import Transports
    from disagfusion.protocol import TensorRef
    from disagfusion.transport.ref import checksum, tensor_bytes
    ref = TensorRef.model_validate_json(sys.stdin.read())
    transports = Transports(Settings(transport="cuda_ipc", nats_url=sys.argv[1]))
    tensor = transports.get(ref)
    assert tensor.is_cuda and tensor.dtype == torch.bfloat16 and list(tensor.shape) == ref.shape
    print(checksum(tensor_bytes(tensor)), flush=True)
    del tensor
    torch.cuda.synchronize()
    if sys.argv[2] == "release":
        transports.delete(ref)
    transports.close()
    """
)


def consume(ref: TensorRef, nats_url: str, release: bool) -> str:
    done = subprocess.run([sys.executable, "-c", CONSUMER, nats_url, "release" if release else "keep"],
                          input=ref.model_dump_json(), capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@needs_cuda
@pytest.mark.parametrize("release", [True, False], ids=["released", "lease-expired"])
def test_other_process_reads_bit_exact_and_producer_memory_is_freed(nats_server: str, release: bool) -> None:
    settings = Settings(transport="cuda_ipc", inline_max_bytes=0, nats_url=nats_server, ipc_lease_s=300 if release else 2)
    transports = Transports(settings)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    tensor = torch.randn(4096, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).bfloat16()
    torch.cuda.synchronize()
    expected = checksum(tensor_bytes(tensor))
    ref = transports.put("job.denoise.latents", tensor)
    assert ref.transport == "cuda_ipc" and torch.equal(transports.get(ref), tensor)  # same process: no IPC
    del tensor
    assert torch.cuda.memory_allocated() >= before + 4096 * 4096 * 2  # held by the registry
    assert consume(ref, nats_server, release) == expected
    assert wait_until(lambda: len(transports.cuda_ipc.registry) == 0)
    torch.cuda.ipc_collect()
    assert wait_until(lambda: (torch.cuda.ipc_collect(), torch.cuda.memory_allocated())[1] <= before)
    with pytest.raises(MissingBlobError):
        transports.get(ref)
    transports.close()
