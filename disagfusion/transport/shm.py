"""Same-host handoff through slot files in a tmpfs directory (/dev/shm) that both sides keep mapped.

Each producer owns a set of slot files (``slot-<pid>-<id>-<n>``): one tensor's bytes after a
one-page header. A slot is reused: ``put`` copies the tensor into a free slot of its size class
(one copy into pages that are already mapped and warm), ``delete`` marks it free again, and a
consumer maps each slot file once and keeps the mapping. Fresh pages cost more than copying the
bytes on a VM (about 5 µs per 4 KiB page, see bench/RESULTS.md), so in the steady
state a handoff touches no new page and makes no mapping call.

Zero copy: ``empty`` claims a slot and returns a tensor over the producer's shared mapping of
it; a stage that writes its output there hands it over with ``put`` without any copy. A claim
that is never put is freed once its tensor is garbage.

The header's first word packs ``generation | pins | state``; every change is one aligned 8-byte
store under a lock (a process-wide mutex plus an open-file-description lock on the word, which
the kernel drops when a process dies), so a crash leaves a whole word behind. A ref's key carries the slot
and its generation: ``<slot file>:<generation>:<producer's key>``. ``put`` bumps the
generation when it claims a free slot, so a stale ref fails with ``MissingBlobError`` and never
reads a later tensor's bytes. ``get`` pins the slot and returns a tensor over the consumer's
copy-on-write mapping of it, without copying: writes into that tensor stay in the consumer. The
slot is only freed once every pinning process has deleted it (a redelivered task read by two
workers at once is safe), so a tensor from ``get`` is valid until its ``delete``.

No checksum (``TensorRef.checksum`` is empty), unlike Redis and inline refs: the bytes never
leave this host's memory, where nothing flips them in transit, and hashing them would cost a
pass over every byte at each end, more than the copy this transport saves (bench/RESULTS.md).
What a checksum caught here were the slot's own hazards, and they are checked instead: a
stale or reused slot by the generation, a short or truncated file by its size. A consumer's
own writes into a tensor from ``get`` (made private by copy-on-write, so they would hide the
producer's next bytes in that slot) are noticed by the tensor's version counter, which every
torch in-place op bumps, and dropped before the slot is read again. Writes that bypass torch's
counter (through ``.data``, a numpy view or a raw pointer) are not noticed: a model must not
write into its inputs that way.

Liveness needs no pid: a producer holds a shared ``flock`` on each of its slot files for as long
as it runs. The janitor (``sweep``, which every worker runs) unlinks a producer's slots
that have gone unfreed for the TTL (a consumer crashed), and the files of dead producers once
they are free or stale; an unlinked file stays valid for whoever still has it mapped. Nothing
here truncates a slot file; one truncated by another process under a live tensor makes reads
of the lost pages fault (SIGBUS), and ``get`` refuses a slot shorter than its ref.
"""

from __future__ import annotations

import errno
import fcntl
import math
import mmap
import os
import re
import stat
import struct
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from disagfusion.errors import DisagFusionError
from disagfusion.protocol import MissingBlobError, TensorRef, TransportName
from disagfusion.transport.ref import DTYPE_NAMES, DTYPES, tensor_bytes

DOMAIN_FILE = "domain"
"""The shm domain's id in the directory (``disagfusion.transport.locality``): never swept."""

HEADER_BYTES = mmap.PAGESIZE
"""The slot's data starts on the next page, so it can be mapped on its own."""
SLOT_NAME = re.compile(r"slot-\d+-[0-9a-f]{12}-\d+")

FREE, WRITING, READY, DELETED, RETIRED = range(5)
"""Slot states. DELETED: deleted by one consumer, still pinned by another. RETIRED: unlinked."""
_WORD = struct.Struct("<Q")
_CLAIMED_AT = struct.Struct("<d")
_CLAIMED_AT_OFFSET = 8
_PINS_BITS, _STATE_BITS = 16, 8

_HEADER_LOCK = threading.Lock()
"""Serialises header updates within the process; the OFD lock below does so across processes."""
_FLOCK = struct.Struct("hhqqi4x")
"""struct flock on Linux (l_type, l_whence, l_start, l_len, l_pid), for open-file-description
locks: unlike classic fcntl locks, closing another descriptor of the file (a mapping's
duplicate, a janitor's probe) does not drop them, and the kernel drops them when the process dies."""


def pack_word(generation: int, pins: int, state: int) -> int:
    return (generation << (_PINS_BITS + _STATE_BITS)) | (pins << _STATE_BITS) | state


def unpack_word(word: int) -> tuple[int, int, int]:
    return word >> (_PINS_BITS + _STATE_BITS), (word >> _STATE_BITS) & ((1 << _PINS_BITS) - 1), word & 0xFF


def size_class(nbytes: int) -> int:
    """Slot capacity for ``nbytes``: whole pages, rounded up to one of four steps per power of
    two, so tensors of nearly the same size share slots and at most ~19% is unused."""
    pages = max(1, -(-nbytes // mmap.PAGESIZE))
    top = 1 << (pages - 1).bit_length()
    step = max(1, top // 8)
    return -(-pages // step) * step * mmap.PAGESIZE


def parse_key(key: str) -> tuple[str, int]:
    """(slot file name, generation) from a ref's key; MissingBlobError if it names no slot."""
    name, _, rest = key.partition(":")
    generation = rest.partition(":")[0]
    if not SLOT_NAME.fullmatch(name) or not generation.isdigit():
        raise MissingBlobError(f"tensor key {key!r} names no shm slot (expired or deleted)")
    return name, int(generation)


class SlotHeader:
    """The header word of one slot file, read and changed through a shared mapping."""

    def __init__(self, fd: int, header: mmap.mmap):
        self.fd = fd
        self.header = header
        # Closed when the last user lets go, so a thread still holding a dropped slot never
        # locks a descriptor number that has been reused for another file.
        self.close = weakref.finalize(self, os.close, fd)

    @contextmanager
    def locked(self) -> Iterator[tuple[int, int, int]]:
        with _HEADER_LOCK:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, _WORD.size, 0))
            try:
                yield unpack_word(self.peek())
            finally:
                fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, _WORD.size, 0))

    def peek(self) -> int:
        return _WORD.unpack_from(self.header, 0)[0]

    def store(self, generation: int, pins: int, state: int) -> None:
        _WORD.pack_into(self.header, 0, pack_word(generation, pins, state))

    def claimed_at(self) -> float:
        return _CLAIMED_AT.unpack_from(self.header, _CLAIMED_AT_OFFSET)[0]

    def stamp(self, when: float) -> None:
        _CLAIMED_AT.pack_into(self.header, _CLAIMED_AT_OFFSET, when)



class OwnSlot(SlotHeader):
    """A slot this process writes: the whole file mapped shared, its data as a byte array."""

    def __init__(self, path: Path, capacity: int):
        tmp = path.with_name(f".{path.name}.tmp")  # the janitor only looks at finished slot files
        # O_EXCL|O_NOFOLLOW: never through a file or link someone placed under this name.
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.ftruncate(fd, HEADER_BYTES + capacity)
        fcntl.flock(fd, fcntl.LOCK_SH)  # "my producer is alive" for as long as fd is open
        mapping = mmap.mmap(fd, HEADER_BYTES + capacity)
        super().__init__(fd, mapping)
        self.path, self.capacity = path, capacity
        self.data = np.frombuffer(mapping, dtype=np.uint8, offset=HEADER_BYTES)
        self.stamp(time.time())
        self.store(1, 0, WRITING)
        os.rename(tmp, path)

    # Only the producer changes a free or a writing slot (readers back off from both), claims
    # are serialised by ShmTransport._lock, and a writing slot belongs to the put that claimed
    # it: these two need no header lock.

    def try_claim(self) -> int | None:
        """The new generation if the slot was free (it is now being written), else None."""
        generation, _, state = unpack_word(self.peek())
        if state != FREE:
            return None
        self.stamp(time.time())
        self.store(generation + 1, 0, WRITING)
        return generation + 1

    def vanished(self) -> bool:
        """Whether the slot's file was removed under it (by an operator, a cleanup script): a
        tensor written to it now could never be found by name."""
        return os.fstat(self.fd).st_nlink == 0

    def finish(self, generation: int, state: int) -> None:
        """WRITING -> READY once the bytes are in, or back to FREE if writing failed."""
        self.store(generation, 0, state)

    def retire(self, claimed_before: float) -> bool:
        """Unlink the slot if it is free or was claimed before ``claimed_before``, so no new
        ``get`` finds it; whoever has it mapped keeps valid bytes."""
        with self.locked() as (generation, _, state):
            if state != FREE and self.claimed_at() >= claimed_before:
                return False
            self.store(generation + 1, 0, RETIRED)
            self.path.unlink(missing_ok=True)
        self.close()
        return True


class PeerSlot(SlotHeader):
    """A slot as a reader sees it: the header mapped shared, the data copy-on-write."""

    def __init__(self, path: Path):
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            header = mmap.mmap(fd, HEADER_BYTES)
            data = mmap.mmap(fd, max(0, size - HEADER_BYTES), access=mmap.ACCESS_COPY, offset=HEADER_BYTES)
        except BaseException:
            os.close(fd)
            raise
        super().__init__(fd, header)
        self.data = data
        self._handed: torch.Tensor | None = None
        """The last tensor handed out over ``data``, and its version counter then."""
        self._handed_version = 0

    def gone(self) -> bool:
        return os.fstat(self.fd).st_nlink == 0 or unpack_word(self.peek())[2] == RETIRED

    def check_size(self, ref: TensorRef) -> None:
        """MissingBlobError unless the file (still) holds the ref's bytes."""
        have = min(len(self.data), os.fstat(self.fd).st_size - HEADER_BYTES)
        if have < ref.nbytes:
            raise MissingBlobError(f"tensor {ref.key!r}: its shm slot file is truncated "
                                   f"({max(0, have)} data bytes, the ref names {ref.nbytes})")

    def hand_out(self, ref: TensorRef, dtype: torch.dtype) -> torch.Tensor:
        """The ref's tensor over the copy-on-write mapping, without copying.

        Pages the previous tensor wrote into are private to this process and would hide what
        the producer has written since, so they are dropped first (the next read maps the shared
        pages again). Every torch in-place op bumps a tensor's version counter, shared with its
        views, so an unchanged counter proves there is nothing to drop: the pages stay mapped."""
        if self._handed is not None and self._handed._version != self._handed_version:
            end = -(-self._handed.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
            self.data.madvise(mmap.MADV_DONTNEED, 0, min(len(self.data), end))
        if not ref.nbytes:
            return torch.empty(ref.shape, dtype=dtype)
        tensor = torch.frombuffer(self.data, dtype=dtype, count=ref.nbytes // dtype.itemsize)
        self._handed, self._handed_version = tensor, tensor._version
        return tensor.view(ref.shape)

    def read_copy(self, ref: TensorRef, dtype: torch.dtype) -> torch.Tensor:
        """The ref's tensor read from the file into new memory: for a second tensor of a slot
        this process already hands out, which must not share (or see) the first one's pages."""
        tensor = torch.empty(ref.shape, dtype=dtype)
        got = os.preadv(self.fd, [tensor.view(-1).view(torch.uint8).numpy()], HEADER_BYTES) if ref.nbytes else 0
        if got != ref.nbytes:
            raise MissingBlobError(f"tensor {ref.key!r}: its shm slot file was truncated while being read "
                                   f"({got} of {ref.nbytes} bytes)")
        return tensor


def private_directory(directory: Path) -> None:
    """Make ``directory`` (mode 0700) or check one that exists: a real directory, not a symlink,
    owned by this user; its mode is narrowed to 0700. Anything else is refused, so no other user
    can place, read or swap slot files (a compose tmpfs mount is owned by the service user)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ShmDirectoryError(f"shm directory {directory} is not a directory (a symlink or a file): refusing to use it")
    if st.st_uid != os.geteuid():
        raise ShmDirectoryError(f"shm directory {directory} belongs to uid {st.st_uid}, not this service's "
                                f"uid {os.geteuid()}: refusing to use it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(directory, 0o700, follow_symlinks=False)


class ShmDirectoryError(DisagFusionError, RuntimeError):
    """The shm directory is not this service's own."""


class ShmTransport:
    name: TransportName = "shm"

    def __init__(self, directory: Path, pool_bytes: int = 1 << 30):
        self.directory = directory
        self.pool_bytes = pool_bytes
        """At most this many bytes of free slots are kept for reuse."""
        private_directory(directory)
        self._prefix = f"slot-{os.getpid()}-{uuid.uuid4().hex[:12]}-"
        self._lock = threading.Lock()
        self._created = 0
        self._own: dict[int, list[OwnSlot]] = {}
        """Capacity -> this producer's slots of that size class."""
        self._peers: dict[str, PeerSlot] = {}
        """Slot file name -> this process's mapping of it, kept so its pages stay mapped."""
        self._pinned: Counter[tuple[str, int]] = Counter()
        """(slot, generation) -> pins this process holds (its gets not yet deleted)."""
        self._writing: dict[int, tuple[OwnSlot, int, int]] = {}
        """Address of a tensor from ``empty`` -> its claim (slot, generation, bytes), until put."""

    # ------------------------------------------------------------------ producer

    def empty(self, shape: list[int] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor in a claimed slot of this producer's, for a stage to write its output into;
        ``put`` then hands it over without copying. Freed again if it is never put. Once put, it
        is the slot's: the producer must drop it, as the slot is reused after its consumers delete it."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        slot, generation = self._claim(nbytes)
        raw = slot.data[:nbytes]  # a new array, which the tensor's storage holds until it dies
        tensor = torch.frombuffer(raw, dtype=dtype).view(shape)
        claim = (slot, generation, nbytes)
        self._writing[tensor.data_ptr()] = claim
        weakref.finalize(raw, self._abandon, tensor.data_ptr(), claim)
        return tensor

    def _abandon(self, address: int, claim: tuple[OwnSlot, int, int]) -> None:
        """Free a claim from ``empty`` whose tensor died without a ``put``. It takes no lock (a
        finaliser may run inside a locked section): nothing else touches a slot being written,
        and the address is claimed anew only after this frees the slot."""
        if self._writing.get(address) is claim:
            del self._writing[address]
            slot, generation, _ = claim
            slot.finish(generation, FREE)

    def put(self, key: str, tensor: torch.Tensor) -> TensorRef:
        dtype, nbytes = DTYPE_NAMES[tensor.dtype], tensor.numel() * tensor.element_size()
        in_place = tensor.device.type == "cpu" and tensor.is_contiguous()
        claim = self._writing.pop(tensor.data_ptr(), None) if in_place else None
        if claim is not None:  # written in place by the producer (a tensor cannot outgrow its claim)
            slot, generation, _ = claim
        else:
            raw = tensor_bytes(tensor)
            slot, generation = self._claim(nbytes)
            try:
                np.copyto(slot.data[:nbytes], raw)
            except BaseException:
                slot.finish(generation, FREE)
                raise
        slot.finish(generation, READY)
        return TensorRef(
            transport="shm",
            key=f"{slot.path.name}:{generation}:{key}",
            dtype=dtype,
            shape=list(tensor.shape),
            nbytes=nbytes,
            checksum="",  # see the module's docstring: no byte hash on one host
        )

    def _claim(self, nbytes: int) -> tuple[OwnSlot, int]:
        capacity = size_class(nbytes)
        with self._lock:
            slots = self._own.setdefault(capacity, [])
            for slot in [slot for slot in slots if slot.vanished()]:
                slots.remove(slot)  # a new file takes its place; readers of its old bytes keep them
                slot.close()
            for slot in slots:
                generation = slot.try_claim()
                if generation is not None:
                    return slot, generation
            self._trim_pool(self.pool_bytes - capacity)
            slot = OwnSlot(self.directory / f"{self._prefix}{self._created}", capacity)
            self._created += 1
            self._own.setdefault(capacity, []).append(slot)
            return slot, 1

    def _trim_pool(self, keep_bytes: int) -> None:
        """Unlink free slots, least recently claimed first, until at most ``keep_bytes`` are free."""
        free = sorted((s for slots in self._own.values() for s in slots if unpack_word(s.peek())[2] == FREE),
                      key=lambda s: s.claimed_at())
        excess = sum(s.capacity for s in free) - max(0, keep_bytes)
        for slot in free:
            if excess <= 0:
                break
            if slot.retire(claimed_before=-math.inf):  # only if still free
                self._own[slot.capacity].remove(slot)
                excess -= slot.capacity

    # ------------------------------------------------------------------ consumer

    def get(self, ref: TensorRef) -> torch.Tensor:
        name, generation = parse_key(ref.key)
        dtype = DTYPES.get(ref.dtype)
        if dtype is None or ref.nbytes != math.prod(ref.shape) * dtype.itemsize:
            raise MissingBlobError(f"tensor {ref.key!r}: {ref.nbytes} bytes cannot hold {ref.dtype} {ref.shape}")
        peer = self._peer(name, ref.key)
        with self._lock:  # one decision per process: the first pin gets the mapping, later ones a copy
            holds = self._pinned[name, generation] > 0
            self._pinned[name, generation] += 1
        try:
            with peer.locked() as (current, pins, state):
                # A deleted slot that another consumer still pins is only readable to the pinners.
                if current != generation or not (state == READY or state == DELETED and holds):
                    raise MissingBlobError(f"tensor {ref.key!r} is not in {self.directory} (expired or deleted)")
                peer.store(current, pins + 1, state)
        except BaseException:
            self._unpin_locally(name, generation)
            raise
        try:
            peer.check_size(ref)
            return peer.read_copy(ref, dtype) if holds else peer.hand_out(ref, dtype)
        except BaseException:
            self._release(ref, deleting=False)
            raise

    def _peer(self, name: str, key: str) -> PeerSlot:
        with self._lock:
            peer = self._peers.get(name)
            if peer is None:
                try:
                    peer = self._peers[name] = PeerSlot(self.directory / name)
                except FileNotFoundError:
                    raise MissingBlobError(f"tensor {key!r} is not in {self.directory} (expired or deleted)") from None
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
                    raise MissingBlobError(f"tensor {key!r}: {self.directory / name} is a symlink, not a slot file") from None
            return peer

    def read_range(self, ref: TensorRef, offset: int, size: int) -> bytes:
        """``size`` bytes of the ref's tensor from ``offset``, read from its slot file without
        pinning it: for serving them to a consumer on another host (``locality``), which frees
        the tensor with a ``delete`` through this domain when it is done. The slot's generation
        is checked before and after the read, so bytes of a reused slot are never returned."""
        name, generation = parse_key(ref.key)
        peer = self._peer(name, ref.key)
        size = max(0, min(size, ref.nbytes - offset))

        def check() -> None:
            current, _, state = unpack_word(peer.peek())
            if current != generation or state not in (READY, DELETED):
                raise MissingBlobError(f"tensor {ref.key!r} is not in {self.directory} (expired or deleted)")

        check()
        peer.check_size(ref)
        data = os.pread(peer.fd, size, HEADER_BYTES + offset) if size else b""
        check()
        return data

    def delete(self, ref: TensorRef) -> None:
        """Release this process's pin and mark the tensor deleted: no new ``get`` finds it, and
        the slot is free for reuse once no process pins it."""
        self._release(ref, deleting=True)

    def _release(self, ref: TensorRef, deleting: bool) -> None:
        try:
            name, generation = parse_key(ref.key)
            peer = self._peer(name, ref.key)
        except MissingBlobError:
            return
        held = self._unpin_locally(name, generation)
        with peer.locked() as (current, pins, state):
            if current != generation or state not in (READY, DELETED):
                return
            pins -= min(pins, 1 if held else 0)  # a delete without a get drops nobody else's pin
            if deleting or state == DELETED:
                state = DELETED if pins else FREE
            peer.store(current, pins, state)

    def _unpin_locally(self, name: str, generation: int) -> int:
        """Drop one of this process's pins on the slot; how many it held before."""
        with self._lock:
            held = self._pinned.pop((name, generation), 0)
            if held > 1:
                self._pinned[name, generation] = held - 1
            return held

    # ------------------------------------------------------------------ janitor

    def sweep(self, ttl_s: float) -> int:
        """Unlink slots nobody freed within ``ttl_s`` of being written (a consumer crashed or the
        job was abandoned), free slots unused that long, and the slot files of dead producers
        once they are free or stale. Other files older than ``ttl_s`` go too."""
        cutoff = time.time() - ttl_s
        removed = 0
        with self._lock:
            own = {slot.path.name for slots in self._own.values() for slot in slots}
            for slots in self._own.values():
                for slot in [s for s in slots if s.claimed_at() < cutoff and unpack_word(s.peek())[2] != WRITING]:
                    if slot.retire(claimed_before=cutoff):
                        slots.remove(slot)
                        removed += 1
        for name in os.listdir(self.directory):
            if name in own or name == DOMAIN_FILE:  # the domain id lives as long as the directory
                continue
            path = self.directory / name
            try:
                if SLOT_NAME.fullmatch(name) and not path.is_symlink():
                    removed += self._remove_if_orphaned(path, cutoff)
                elif path.lstat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # another worker's janitor got there first
        with self._lock:
            for name, peer in list(self._peers.items()):
                if peer.gone():
                    del self._peers[name]  # its descriptor closes once no thread uses it
        return removed

    @staticmethod
    def _remove_if_orphaned(path: Path, cutoff: float) -> int:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # its producer is alive and looks after it
            return 0
        header = SlotHeader(fd, mmap.mmap(fd, HEADER_BYTES))
        try:
            with header.locked() as (generation, _, state):
                if state in (READY, DELETED) and header.claimed_at() >= cutoff:
                    return 0  # a consumer may still come for it
                header.store(generation + 1, 0, RETIRED)
                path.unlink(missing_ok=True)
                return 1
        finally:
            header.close()

    def close(self) -> None:
        """Unlink the free slots and let go of the others: published tensors stay readable, and
        the janitors remove them once consumed or stale, as this producer no longer holds them."""
        with self._lock:
            for slots in self._own.values():
                for slot in slots:
                    slot.retire(claimed_before=-math.inf)  # only if free
            self._own.clear()
            self._peers.clear()
