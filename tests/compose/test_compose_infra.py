"""nats and redis of compose.yaml come up healthy under the hostnet override, and are what the
services need: JetStream on, Redis refusing to evict tensor blobs."""

from __future__ import annotations

import nats
import nats.errors
import pytest
import redis

from compose_support import ComposeStack


async def test_infra_healthy_and_configured(compose_stack) -> None:
    stack: ComposeStack = compose_stack(services=["nats", "redis"])
    assert stack.health("nats") == ["healthy"]
    assert stack.health("redis") == ["healthy"]

    client = await nats.connect(stack.nats_url)
    try:
        stream = await client.jetstream().add_stream(name="DF_COMPOSE_TEST", subjects=["df.compose.test"])
        assert stream.config.name == "DF_COMPOSE_TEST"
    finally:
        await client.close()

    # auth on (docs/security.md): strangers are refused by both servers
    anonymous = stack.nats_url.replace(stack.nats_url.split("//")[1].split("@")[0] + "@", "")
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(anonymous, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(stack.redis_url.replace(stack.redis_url.split("//")[1].split("@")[0] + "@", "")).ping()

    store = redis.Redis.from_url(stack.redis_url)
    try:
        assert store.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert int(store.config_get("maxmemory")["maxmemory"]) > 0
    finally:
        store.close()
    # the stack only uses the host's network: it made none of its own
    assert stack.docker.network.list(filters=[("label", f"com.docker.compose.project={stack.project}")]) == []
