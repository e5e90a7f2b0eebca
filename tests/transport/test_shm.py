"""The shm transport reuses slots safely: a stale ref never reads a later tensor, a slot stays
put while any consumer pins it, and janitors clean up after crashed consumers and dead producers."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from disagfusion.protocol import MissingBlobError, TensorRef
from disagfusion.transport.shm import HEADER_BYTES, ShmDirectoryError, ShmTransport, parse_key, size_class

ROOT = Path(__file__).resolve().parents[2]
FLOATS = 300_000  # 1.2 MB


def slot_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("slot-"))


def test_deleted_slot_is_reused_and_the_stale_ref_fails(tmp_path: Path) -> None:
    shm = ShmTransport(tmp_path)
    first = shm.put("job1.encode.x", torch.zeros(FLOATS))
    shm.delete(first)
    tensor = torch.arange(FLOATS, dtype=torch.float32)
    second = shm.put("job2.encode.x", tensor)
    (name1, gen1), (name2, gen2) = parse_key(first.key), parse_key(second.key)
    assert name1 == name2 and gen2 == gen1 + 1 and slot_files(tmp_path) == [name1]
    assert second.key.endswith(":job2.encode.x")
    with pytest.raises(MissingBlobError, match="expired or deleted"):
        shm.get(first)  # same slot, older generation
    assert torch.equal(shm.get(second), tensor)  # every byte was overwritten
    other_size = shm.put("job3.encode.x", torch.ones(4 * FLOATS))
    assert parse_key(other_size.key)[0] != name1


def test_keys_that_name_no_slot_are_missing(tmp_path: Path) -> None:
    shm = ShmTransport(tmp_path)
    ref = shm.put("k", torch.ones(3))
    for key in ["../etc/passwd:1:k", "slot-1-abcdefabcdef-0:x:k", ref.key.replace(":1:", ":7:")]:
        with pytest.raises(MissingBlobError):
            shm.get(ref.model_copy(update={"key": key}))
        shm.delete(ref.model_copy(update={"key": key}))  # a no-op, not an error
    assert torch.equal(shm.get(ref), torch.ones(3))


def test_slot_stays_while_another_consumer_pins_it(tmp_path: Path) -> None:
    producer, reader_a, reader_b = ShmTransport(tmp_path), ShmTransport(tmp_path), ShmTransport(tmp_path)
    tensor = torch.arange(FLOATS, dtype=torch.float32)
    ref = producer.put("k", tensor)
    held = reader_a.get(ref)
    reader_b.get(ref)
    reader_b.delete(ref)  # a redelivered copy of the task finished first
    with pytest.raises(MissingBlobError):
        ShmTransport(tmp_path).get(ref)  # deleted: nobody new may read it
    newer = producer.put("k2", torch.zeros(FLOATS))
    assert parse_key(newer.key)[0] != parse_key(ref.key)[0]  # the pinned slot was not reused
    assert torch.equal(held, tensor)
    reader_a.delete(ref)
    reused = producer.put("k3", torch.zeros(FLOATS))
    assert parse_key(reused.key)[0] == parse_key(ref.key)[0]


def test_writes_into_a_tensor_from_get_stay_with_the_consumer(tmp_path: Path) -> None:
    producer, consumer = ShmTransport(tmp_path), ShmTransport(tmp_path)
    ref = producer.put("k", torch.ones(FLOATS))
    got = consumer.get(ref)
    got.mul_(3)  # in place, as a model may do
    other = ShmTransport(tmp_path)
    assert torch.equal(other.get(ref), torch.ones(FLOATS))
    other.delete(ref)
    consumer.delete(ref)
    tensor = torch.arange(FLOATS, dtype=torch.float32)
    again = producer.put("k", tensor)
    assert parse_key(again.key)[0] == parse_key(ref.key)[0]
    assert torch.equal(consumer.get(again), tensor)  # not the consumer's stale private pages


def test_threads_put_get_and_delete_concurrently(tmp_path: Path) -> None:
    shm = ShmTransport(tmp_path)

    def handoffs(worker: int) -> int:
        for i in range(40):
            tensor = torch.full((1000 * (1 + (worker + i) % 3),), float(worker * 1000 + i))
            ref = shm.put(f"w{worker}.{i}", tensor)
            assert torch.equal(shm.get(ref), tensor)
            shm.delete(ref)
            with pytest.raises(MissingBlobError):
                shm.get(ref)
        return worker

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(handoffs, range(8))) == list(range(8))
    assert len(slot_files(tmp_path)) <= 8 * 3  # slots were reused, not one per handoff


def test_pool_keeps_at_most_its_budget_of_free_slots(tmp_path: Path) -> None:
    one, other = size_class(4 * FLOATS), size_class(8 * FLOATS)
    shm = ShmTransport(tmp_path, pool_bytes=2 * one + other)
    refs = [shm.put(f"k{i}", torch.zeros(FLOATS)) for i in range(3)]
    for ref in refs:
        shm.delete(ref)
    shm.put("other", torch.zeros(2 * FLOATS))  # a new slot must fit in the budget with the free ones
    assert len(slot_files(tmp_path)) == 2 + 1


def test_close_unlinks_free_slots_and_keeps_unread_ones(tmp_path: Path) -> None:
    producer, consumer = ShmTransport(tmp_path), ShmTransport(tmp_path)
    consumed = producer.put("a", torch.ones(FLOATS))
    consumer.get(consumed)
    consumer.delete(consumed)
    unread = producer.put("b", torch.ones(FLOATS))
    producer.close()
    assert slot_files(tmp_path) == [parse_key(unread.key)[0]]
    assert torch.equal(consumer.get(unread), torch.ones(FLOATS))


def test_unfreed_slots_are_reclaimed_after_the_ttl(tmp_path: Path, age_slot) -> None:
    shm = ShmTransport(tmp_path)
    crashed = shm.put("a", torch.ones(FLOATS))
    ShmTransport(tmp_path).get(crashed)  # a consumer that never deletes (it crashed)
    fresh = shm.put("b", torch.ones(FLOATS))
    age_slot(tmp_path, crashed, 7200)
    assert ShmTransport(tmp_path).sweep(3600) == 0  # only the producer reclaims a live producer's slots
    assert shm.sweep(3600) == 1
    assert slot_files(tmp_path) == [parse_key(fresh.key)[0]]
    with pytest.raises(MissingBlobError):
        ShmTransport(tmp_path).get(crashed)


PRODUCER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from disagfusion.transport.shm import ShmTransport
    shm = ShmTransport(Path(sys.argv[1]))
    for line in sys.stdin:
        size = int(line)
        print(shm.put("k", torch.arange(size, dtype=torch.float32)).model_dump_json(), flush=True)
    """
)


def test_two_processes_hand_over_and_dead_producers_are_cleaned_up(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", PRODUCER, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)

    def put(size: int) -> TensorRef:
        child.stdin.write(f"{size}\n")
        child.stdin.flush()
        return TensorRef.model_validate_json(child.stdout.readline())

    try:
        consumer = ShmTransport(tmp_path)
        first = put(FLOATS)
        assert torch.equal(consumer.get(first), torch.arange(FLOATS, dtype=torch.float32))
        consumer.delete(first)
        second = put(FLOATS)
        assert parse_key(second.key) == (parse_key(first.key)[0], parse_key(first.key)[1] + 1)
        unread = put(2 * FLOATS)
        freed = put(3 * FLOATS)
        consumer.get(freed)
        consumer.delete(freed)
        assert consumer.sweep(3600) == 0  # the producer is alive: its slots are its own
    finally:
        child.stdin.close()
        child.wait(30)
    # The producer is gone: its free slot goes, the ones still waiting for a consumer stay readable.
    assert ShmTransport(tmp_path).sweep(3600) == 1
    assert len(slot_files(tmp_path)) == 2
    assert torch.equal(consumer.get(unread), torch.arange(2 * FLOATS, dtype=torch.float32))
    consumer.delete(unread)
    consumer.delete(second)
    assert ShmTransport(tmp_path).sweep(3600) == 2 and slot_files(tmp_path) == []


LOCK_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from disagfusion.transport.shm import PeerSlot
    with PeerSlot(Path(sys.argv[1])).locked():
        print("locked", flush=True)
        time.sleep(120)
    """
)


def test_a_process_killed_while_holding_a_slot_lock_blocks_nobody(tmp_path: Path) -> None:
    shm = ShmTransport(tmp_path)
    tensor = torch.arange(FLOATS, dtype=torch.float32)
    ref = shm.put("k", tensor)
    path = tmp_path / parse_key(ref.key)[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        probe = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # the lock really is held
                fcntl.fcntl(probe, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 8, 0))
        finally:
            os.close(probe)
    finally:
        holder.kill()
        holder.wait(30)
    assert torch.equal(shm.get(ref), tensor)


# ------------------------------------------------------------------ zero copy


def mapping_range(buffer) -> tuple[int, int]:
    """[start, end) addresses of a mapping (an mmap or an array over one)."""
    array = np.frombuffer(buffer, dtype=np.uint8)
    return array.ctypes.data, array.ctypes.data + array.nbytes


def test_an_output_written_into_a_slot_is_handed_over_without_a_copy(tmp_path: Path) -> None:
    producer, consumer = ShmTransport(tmp_path), ShmTransport(tmp_path)
    out = producer.empty((FLOATS,), torch.float32)
    torch.arange(FLOATS, dtype=torch.float32, out=out)  # the stage's last op writes straight in
    ref = producer.put("k", out)
    (slot,) = [s for slots in producer._own.values() for s in slots]
    assert out.data_ptr() == mapping_range(slot.data)[0] and ref.checksum == ""
    got = consumer.get(ref)
    start, end = mapping_range(consumer._peers[parse_key(ref.key)[0]].data)
    assert start == got.data_ptr() and got.data_ptr() + ref.nbytes <= end  # a view of the mapping
    assert torch.equal(got, torch.arange(FLOATS, dtype=torch.float32))
    consumer.delete(ref)
    again = producer.put("k2", torch.ones(FLOATS))  # a plain tensor is copied into the freed slot
    assert parse_key(again.key) == (slot.path.name, parse_key(ref.key)[1] + 1)
    assert consumer.get(again).data_ptr() == start  # the same warm pages, mapped once


def test_consumer_writes_reach_neither_the_producer_nor_its_next_tensor(tmp_path: Path) -> None:
    producer, consumer = ShmTransport(tmp_path), ShmTransport(tmp_path)
    out = producer.empty((FLOATS,), torch.float32)
    out.fill_(1.0)
    ref = producer.put("k", out)
    got = consumer.get(ref)
    got[: FLOATS // 2].mul_(3)  # in place through a view, as a model may do
    assert torch.equal(out, torch.ones(FLOATS))  # copy-on-write: the producer's slot is untouched
    other = ShmTransport(tmp_path)
    assert torch.equal(other.get(ref), torch.ones(FLOATS))  # nor another consumer's tensor
    other.delete(ref)
    consumer.delete(ref)
    nxt = producer.empty((FLOATS,), torch.float32)
    torch.arange(FLOATS, dtype=torch.float32, out=nxt)
    again = producer.put("k2", nxt)
    assert parse_key(again.key)[0] == parse_key(ref.key)[0]
    assert torch.equal(consumer.get(again), torch.arange(FLOATS, dtype=torch.float32))  # its private pages dropped


def test_a_second_get_in_one_process_gets_its_own_copy(tmp_path: Path) -> None:
    producer, consumer = ShmTransport(tmp_path), ShmTransport(tmp_path)
    ref = producer.put("k", torch.ones(FLOATS))
    first = consumer.get(ref)
    first.mul_(2)
    second = consumer.get(ref)  # a redelivered task read again by the same worker
    start, end = mapping_range(consumer._peers[parse_key(ref.key)[0]].data)
    assert not start <= second.data_ptr() < end
    assert torch.equal(second, torch.ones(FLOATS)) and torch.equal(first, torch.full((FLOATS,), 2.0))
    consumer.delete(ref)
    consumer.delete(ref)
    assert parse_key(producer.put("k2", torch.zeros(FLOATS)).key)[0] == parse_key(ref.key)[0]  # both pins gone


def test_an_output_never_put_frees_its_slot(tmp_path: Path) -> None:
    shm = ShmTransport(tmp_path)
    out = shm.empty((FLOATS,), torch.float32)
    name = slot_files(tmp_path)[0]
    del out  # the stage failed before handing it over
    ref = shm.put("k", torch.ones(FLOATS))
    assert parse_key(ref.key) == (name, 2) and slot_files(tmp_path) == [name]


def test_a_truncated_or_vanished_slot_file_is_a_clear_error(tmp_path: Path) -> None:
    producer, early = ShmTransport(tmp_path), ShmTransport(tmp_path)
    ref = producer.put("k", torch.ones(FLOATS))
    path = tmp_path / parse_key(ref.key)[0]
    early.get(ref)
    early.delete(ref)
    ref = producer.put("k", torch.ones(FLOATS))  # `early` keeps the slot mapped from before
    os.truncate(path, HEADER_BYTES + 100)
    for consumer in (early, ShmTransport(tmp_path)):
        with pytest.raises(MissingBlobError, match=rf"truncated \(100 data bytes, the ref names {4 * FLOATS}\)"):
            consumer.get(ref)
    path.unlink()
    with pytest.raises(MissingBlobError, match="expired or deleted"):
        ShmTransport(tmp_path).get(ref)
    with pytest.raises(MissingBlobError, match="cannot hold"):
        producer.get(ref.model_copy(update={"nbytes": ref.nbytes + 4}))


def test_a_symlink_named_like_a_slot_is_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"\0" * (HEADER_BYTES + 16))
    (tmp_path / "shm").mkdir()
    link = tmp_path / "shm" / "slot-1-abcdefabcdef-0"
    link.symlink_to(target)
    shm = ShmTransport(tmp_path / "shm")
    ref = TensorRef(transport="shm", key=f"{link.name}:0:k", dtype="uint8", shape=[16], nbytes=16, checksum="")
    with pytest.raises(MissingBlobError, match="symlink"):
        shm.get(ref)
    os.utime(link, (0, 0), follow_symlinks=False)
    assert shm.sweep(3600) == 1 and not link.is_symlink() and target.exists()


def test_the_directory_is_private_and_a_planted_link_is_never_written_through(tmp_path: Path) -> None:
    """The shm directory is this user's, mode 0700; a symlinked directory is refused; a link
    planted under the name of the producer's next slot file makes the put fail, its target untouched."""
    (tmp_path / "wide").mkdir(mode=0o777)
    os.chmod(tmp_path / "wide", 0o777)
    ShmTransport(tmp_path / "wide")
    assert (tmp_path / "wide").stat().st_mode & 0o777 == 0o700
    (tmp_path / "via-link").symlink_to(tmp_path / "wide")
    with pytest.raises(ShmDirectoryError, match="symlink"):
        ShmTransport(tmp_path / "via-link")

    shm = ShmTransport(tmp_path / "shm")
    assert (tmp_path / "shm").stat().st_mode & 0o777 == 0o700
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    for name in (f".{shm._prefix}0.tmp", f"{shm._prefix}0"):
        (tmp_path / "shm" / name).symlink_to(target)
    with pytest.raises(FileExistsError):
        shm.put("k", torch.ones(4096))
    assert target.read_bytes() == b"precious"


@pytest.mark.parametrize("key", ["../../etc/passwd:1:k", "slot-1-abcdefabcdef-0/../x:1:k", "/tmp/slot-1-abcdefabcdef-0:1:k"])
def test_a_key_naming_a_path_is_refused(tmp_path: Path, key: str) -> None:
    ref = TensorRef(transport="shm", key=key, dtype="uint8", shape=[1], nbytes=1, checksum="")
    with pytest.raises(MissingBlobError, match="names no shm slot"):
        ShmTransport(tmp_path).get(ref)


ZERO_COPY_PRODUCER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from disagfusion.transport.shm import ShmTransport
    shm = ShmTransport(Path(sys.argv[1]))
    out = shm.empty((3, 100, 1000), torch.bfloat16)
    torch.arange(out.numel(), out=out.view(-1))
    print(shm.put("k", out).model_dump_json(), flush=True)
    """
)


def test_a_tensor_written_in_another_process_outlives_its_producer_and_its_file(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", ZERO_COPY_PRODUCER, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=60, check=True)
    ref = TensorRef.model_validate_json(done.stdout)
    consumer = ShmTransport(tmp_path)
    got = consumer.get(ref)
    expected = torch.arange(300_000, dtype=torch.bfloat16).view(3, 100, 1000)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    consumer.delete(ref)
    assert consumer.sweep(3600) == 1 and slot_files(tmp_path) == []  # the dead producer's freed slot went
    assert torch.equal(got, expected)  # still mapped: an unlinked file stays valid for who maps it
    with pytest.raises(MissingBlobError):
        ShmTransport(tmp_path).get(ref)


def test_a_slot_file_removed_under_its_producer_is_not_written_again(tmp_path: Path) -> None:
    """Someone removes a free slot's file: the producer's next put makes a new file a consumer
    can find, instead of writing into the removed one forever (each job through it would vanish)."""
    shm = ShmTransport(tmp_path)
    first = shm.put("job1.encode.x", torch.zeros(FLOATS))
    shm.delete(first)
    os.unlink(tmp_path / parse_key(first.key)[0])
    tensor = torch.arange(FLOATS, dtype=torch.float32)
    second = shm.put("job2.encode.x", tensor)
    assert parse_key(second.key)[0] != parse_key(first.key)[0]
    assert torch.equal(ShmTransport(tmp_path).get(second), tensor)
