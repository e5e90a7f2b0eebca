"""Redis over TLS (docs/security.md "TLS"), against a redis-server that speaks TLS only and asks
every client for a certificate (``make test-tls`` runs Debian's, built with TLS; the wheel's
redis-server is not): the stages' redis transport hands tensors through it with the settings a
deployment sets, and a client in plain text, one that does not verify the server, or one
without a certificate gets nowhere."""

from __future__ import annotations

import pytest
import redis
import torch

from disagfusion.config import Settings
from disagfusion.transport import open_transports
from disagfusion.transport.redis import RedisTransport


def tls_settings(server, **overrides) -> Settings:
    files = {"redis_tls_ca": server.certs.ca, "redis_tls_cert": server.certs.client_cert,
             "redis_tls_key": server.certs.client_key}
    return Settings(redis_url=server.url, transport="redis", **(files | overrides))


def test_tensors_travel_through_a_tls_only_redis(redis_tls_server) -> None:
    transports = open_transports(tls_settings(redis_tls_server))
    tensor = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    ref = transports.redis.put("job.encode.prompt_embeds", tensor)
    assert ref.transport == "redis"
    assert torch.equal(transports.redis.get(ref), tensor)
    transports.redis.delete(ref)


def test_a_tls_redis_refuses_plain_text_unverified_and_anonymous_clients(redis_tls_server) -> None:
    url = redis_tls_server.url
    plain = redis.Redis.from_url(url.replace("rediss://", "redis://", 1), socket_connect_timeout=2, socket_timeout=2)
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    unverified = RedisTransport(url, 60, tls_settings(redis_tls_server, redis_tls_ca=None).redis_tls())
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        unverified.client.ping()
    no_certificate = tls_settings(redis_tls_server, redis_tls_cert=None, redis_tls_key=None).redis_tls()
    with pytest.raises(redis.ConnectionError):
        RedisTransport(url, 60, no_certificate).client.ping()


def test_a_client_certificate_comes_with_its_key(redis_tls_server) -> None:
    with pytest.raises(ValueError, match="DF_REDIS_TLS_CERT and DF_REDIS_TLS_KEY go together"):
        tls_settings(redis_tls_server, redis_tls_key=None)
