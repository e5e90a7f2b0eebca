"""nats and redis of compose.yaml come up healthy under the hostnet override, and are what the
services need: JetStream on, Redis refusing to evict tensor blobs."""

from __future__ import annotations

import nats
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

    store = redis.Redis.from_url(stack.redis_url)
    try:
        assert store.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert int(store.config_get("maxmemory")["maxmemory"]) > 0
    finally:
        store.close()
    # the stack only uses the host's network: it made none of its own
    assert stack.docker.network.list(filters=[("label", f"com.docker.compose.project={stack.project}")]) == []
