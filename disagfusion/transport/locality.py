"""Which tensors can be mapped where: shm domains, and handing tensors across them.

An **shm domain** is every process that shares one shm directory: one host, or a pod group
sharing an ``emptyDir`` volume, or the containers of a compose project sharing its ``shm``
volume. Its id is a file in the directory (``shm_domain``), created once, atomically, by the
first process to look, so every process of the domain reads the same id with no setting at all.
A new volume (a host rebooted, a pod rescheduled) is a new domain, as its files are new too.

How a tensor crosses domains (bench/RESULTS.md, "Handoff per hop", has the measured costs):

- **Push, the normal path.** Every stage worker says which domain it serves from on
  ``df.domains`` every ``AD_EVERY_S`` (``DomainAd``). A producer hands a stage's consumers an
  output through shm only while every consumer it knows of shares its domain; as soon as one
  lives elsewhere, the output goes to Redis, which every host reads and which outlives the
  producer (persistent, with a TTL). So the producing domain can vanish without losing a job.
- **Pull, the fallback.** A consumer can still meet a ref of another domain: it started after
  the producer chose shm (a new host joining, or the first jobs before the ads arrived). It
  then asks any worker of the ref's domain for the bytes over NATS request/reply
  (``df.blob.<domain>``, a queue group), in chunks under NATS's max payload, each checksummed,
  and frees the tensor there the same way once done (the Mooncake pull model).
- **Producer gone.** If no worker of that domain answers, the bytes are gone with it:
  ``UnreachableBlobError``, the one exception a replay of the producing stage hooks into.
  Until then it is a ``MissingBlobError``: the job gets an error result and a dead letter, from
  which ``disagfusion dlq replay`` runs it again.

Which transport a hop used is in its refs (``TensorRef.transport`` and ``domain``), and a
consumer counts what it read per way in ``Locality.reads`` ("shm", "redis", "pull", ...).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import nats.errors

from disagfusion.protocol import (
    DOMAINS_SUBJECT, BlobChunk, BlobRequest, ChecksumError, DomainAd, MissingBlobError, TensorRef, blob_subject, pack,
    unpack,
)
from disagfusion.transport.ref import checksum
from disagfusion.transport.shm import DOMAIN_FILE, ShmTransport

log = logging.getLogger(__name__)

AD_EVERY_S = 2.0
"""How often a worker says which domain it serves from."""
AD_TTL_S = 60.0
"""A worker not heard from for this long is forgotten (one killed without saying it leaves).
Long, so that a killed remote consumer keeps its outputs in Redis until it is surely gone."""
CHUNK_HEADROOM = 4096
"""Bytes of a chunk reply's envelope kept under NATS's max payload."""
CHUNKS_IN_FLIGHT = 4
"""Chunk requests a pull keeps outstanding, so round trips overlap."""
REQUEST_TIMEOUT_S = 10.0
QUEUE_GROUP = "blob"


class UnreachableBlobError(MissingBlobError):
    """A tensor of another shm domain that no worker there can hand over: the domain (its
    producer, and its memory) is gone. Its bytes can only be made again, by replaying the stage
    that produced them; until something does, the job fails like one with a missing input."""


def shm_domain(directory: Path) -> str:
    """The id of the shm domain ``directory`` belongs to, created by the first process to ask.

    Written to a temporary file and linked into place, so a reader never sees a partial id and
    two processes starting at once agree on whichever link won."""
    path = directory / DOMAIN_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    directory.mkdir(parents=True, exist_ok=True)
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:24] or "host"
    candidate = directory / f".domain-{uuid.uuid4().hex}"
    candidate.write_text(f"{host}-{uuid.uuid4().hex[:12]}\n")
    try:
        os.link(candidate, path)
    except FileExistsError:
        pass
    finally:
        candidate.unlink()
    return path.read_text().strip()


class Locality:
    """This worker's shm domain, the domains of the other stage workers, and the pull path.

    The directory fills from ``df.domains`` once ``serve`` runs on the worker's event loop;
    ``local_only``, ``fetch`` and ``free`` are called from the transports' worker threads."""

    def __init__(self, domain: str, shm: ShmTransport, clock: Callable[[], float] = time.monotonic):
        self.domain = domain
        self._shm = shm
        self._clock = clock
        self._lock = threading.Lock()
        self._ads: dict[str, tuple[DomainAd, float]] = {}
        """Worker name -> its latest ad and when it came."""
        self._nc = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reads: Counter[str] = Counter()
        """Tensors this process read, per way: a transport's name, or "pull"."""

    # ----------------------------------------------------------------- the directory

    def heard(self, ad: DomainAd) -> bool:
        """Take in an ad; whether it is from a worker not known before."""
        with self._lock:
            known = ad.worker in self._ads
            if ad.leaving:
                self._ads.pop(ad.worker, None)
            else:
                self._ads[ad.worker] = (ad, self._clock())
        return not known and not ad.leaving

    def consumer_domains(self, stage: str, model: str) -> set[str]:
        """The domains of the workers heard from recently that serve ``stage`` for ``model``."""
        cutoff = self._clock() - AD_TTL_S
        with self._lock:
            return {ad.domain for ad, at in self._ads.values() if at >= cutoff and ad.stage == stage and model in ad.models}

    def local_only(self, stage: str, model: str) -> bool:
        """Whether every known consumer of ``stage`` for ``model`` shares this domain. True when
        none is known: the ones that turn up elsewhere pull."""
        return self.consumer_domains(stage, model) <= {self.domain}

    # ----------------------------------------------------------------- the worker's side

    async def serve(self, nc, worker: str, stage: str, models: list[str]) -> None:
        """Say where this worker serves ``stage`` from, hear the others, and hand this domain's
        shm tensors to consumers elsewhere, until cancelled (then say it leaves)."""
        ad = DomainAd(worker=worker, stage=stage, models=models, domain=self.domain)

        async def announce(leaving: bool = False) -> None:
            try:
                await nc.publish(DOMAINS_SUBJECT, pack(ad.model_copy(update={"leaving": leaving})))
            except Exception as exc:  # reconnecting: the next round says it
                log.debug("domain ad not sent: %s", exc)

        async def on_ad(msg) -> None:
            try:
                if self.heard(unpack(DomainAd, msg.data)):
                    await announce()  # a newcomer learns of this worker at once, not a round later
            except Exception:
                log.exception("bad domain ad on %s", msg.subject)

        self._nc, self._loop = nc, asyncio.get_running_loop()
        subs = [await nc.subscribe(DOMAINS_SUBJECT, cb=on_ad),
                await nc.subscribe(blob_subject(self.domain), queue=QUEUE_GROUP, cb=self._answer)]
        try:
            while True:
                await announce()
                await asyncio.sleep(AD_EVERY_S)
        finally:
            self._loop = None
            await announce(leaving=True)
            for sub in subs:
                try:
                    await sub.unsubscribe()
                except Exception:  # the connection is closing anyway
                    pass

    async def _answer(self, msg) -> None:
        """A ``BlobRequest`` from a consumer in another domain: the bytes, or a delete."""
        try:
            request = unpack(BlobRequest, msg.data)
            if request.delete:
                await asyncio.to_thread(self._shm.delete, request.ref)
                data = b""
            else:
                data = await asyncio.to_thread(self._shm.read_range, request.ref, request.offset, request.size)
            reply = BlobChunk(data=data, checksum=checksum(data))
        except Exception as exc:  # a missing tensor or a bad request: the asker says so
            reply = BlobChunk(error=f"{type(exc).__name__}: {exc}")
        try:
            await msg.respond(pack(reply))
        except Exception as exc:
            log.debug("blob reply not sent: %s", exc)

    # ----------------------------------------------------------------- the consumer's side

    def fetch(self, ref: TensorRef) -> bytearray:
        """The bytes of ``ref``, pulled from a worker of its domain."""
        self.reads["pull"] += 1
        return self._call(self._fetch(ref), ref)

    def free(self, ref: TensorRef) -> None:
        """Free ``ref`` in its domain, through any worker there; gone already is fine."""
        try:
            self._call(self._request(ref, BlobRequest(ref=ref, delete=True)), ref)
        except MissingBlobError:
            pass  # the domain is gone, and its memory with it

    def _call(self, coroutine, ref: TensorRef):
        loop = self._loop
        if loop is None:
            coroutine.close()
            raise UnreachableBlobError(f"tensor {ref.key!r} is in shm domain {ref.domain}, and this process is "
                                       f"not connected to ask it for the bytes")
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    async def _fetch(self, ref: TensorRef) -> bytearray:
        chunk = max(1, self._nc.max_payload - CHUNK_HEADROOM)
        out = bytearray(ref.nbytes)
        offsets = list(range(0, ref.nbytes, chunk))
        for start in range(0, len(offsets), CHUNKS_IN_FLIGHT):
            window = offsets[start:start + CHUNKS_IN_FLIGHT]
            answers = await asyncio.gather(
                *(self._request(ref, BlobRequest(ref=ref, offset=offset, size=chunk)) for offset in window)
            )
            for offset, answer in zip(window, answers, strict=True):
                out[offset:offset + len(answer.data)] = answer.data
                if len(answer.data) != min(chunk, ref.nbytes - offset):
                    raise MissingBlobError(f"tensor {ref.key!r}: domain {ref.domain} sent {len(answer.data)} bytes "
                                           f"at offset {offset}")
        return out

    async def _request(self, ref: TensorRef, request: BlobRequest) -> BlobChunk:
        try:
            msg = await self._nc.request(blob_subject(ref.domain), pack(request), timeout=REQUEST_TIMEOUT_S)
        except nats.errors.NoRespondersError:
            raise UnreachableBlobError(f"tensor {ref.key!r} is in shm domain {ref.domain}, where no worker is left "
                                       f"to hand it over") from None
        answer = unpack(BlobChunk, msg.data)
        if answer.error:
            raise MissingBlobError(f"tensor {ref.key!r} from shm domain {ref.domain}: {answer.error}")
        if answer.checksum != checksum(answer.data):
            raise ChecksumError(f"tensor {ref.key!r}: a chunk from shm domain {ref.domain} is corrupted")
        return answer
