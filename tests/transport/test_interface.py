"""Every backend is a ``Transport``, and the router hands a tensor through each of them alike:
put, get, sweep and delete."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from disagfusion.config import Settings
from disagfusion.transport import MissingBlobError, Transport, Transports

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA device; this torch build or machine has none"
)


@pytest.mark.parametrize("name", ["inline", "shm", "redis", pytest.param("cuda_ipc", marks=needs_cuda)])
def test_every_backend_is_a_transport_the_router_hands_tensors_through(
    request: pytest.FixtureRequest, tmp_path: Path, name: str
) -> None:
    tensor = torch.arange(64, dtype=torch.float32)
    servers: dict[str, str] = {}  # started only for the backend that needs one
    if name == "redis":
        servers["redis_url"] = request.getfixturevalue("redis_server")
    if name == "cuda_ipc":
        servers["nats_url"] = request.getfixturevalue("nats_server")
    settings = Settings(
        transport="shm" if name == "inline" else name,
        inline_max_bytes=tensor.nbytes + 1 if name == "inline" else 0,
        shm_dir=tmp_path, blob_ttl_s=3600, **servers,
    )
    transports = Transports(settings)
    try:
        ref = transports.put(f"job.test.{name}", tensor.cuda() if name == "cuda_ipc" else tensor)
        backend = getattr(transports, name)
        assert isinstance(backend, Transport) and backend.name == ref.transport == name
        assert torch.equal(transports.get(ref).cpu(), tensor)
        assert transports.sweep() == 0  # a fresh tensor is nobody's orphan
        transports.delete(ref)
        if name != "inline":  # an inline ref carries its bytes: deleting frees nothing
            with pytest.raises(MissingBlobError):
                transports.get(ref)
    finally:
        transports.close()
