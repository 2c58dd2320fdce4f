"""
The outage journal: where accepted readings wait, on the gateway's own
disk, while PostgreSQL cannot take them.

Format (``DATA_DIR/journal/``). Segment files named by a rising number,
``00000000000000000007.seg``, each beginning with the 8 bytes
``TXGJRNL1`` and then records::

    mark     4 bytes   A5 5A 4A 52, where a record starts (to find the next one after damage)
    length   uint32    payload bytes, big-endian
    crc      uint32    CRC-32 (zlib) of the payload, big-endian
    payload  JSON      {"d": device id, "n": device name, "s": source, "r": [[metric, ts_us, value], …],
                        "q": [[metric, ts_us, value, rule], …]}

The "q" list (readings held in quarantine, with the rule they failed) is
present only when there are some: a record without it, as every earlier
gateway wrote, replays as before.

Durability. ``append`` queues a record; one flush at a time writes every
queued record and fsyncs the segment in a thread (the ``in_thread`` runner it is given), and
only then do the appenders' Deferreds fire: a group commit of its own, so
a thousand devices share one fsync. A new segment is fsync'd with its
header and the directory is fsync'd after it is created and after one is
removed. A write error (a full disk) truncates the segment back to its last
good length and fails the waiting appenders: nothing unsynced is ever
acknowledged.

Reading back. ``scan`` walks a segment's records. Bytes that do not make a
record (bad mark, impossible length, CRC mismatch, a payload that is not
ours) are a damaged region; scanning resumes at the next mark that starts
a valid record. A damaged region with nothing valid after it, in the
segment that was being written when the previous run ended, is a torn
write from a crash: it was never fsync'd, never acknowledged, and is
dropped. Any other damaged region is moved aside to ``journal/damaged/``,
counted and logged; it never stops the replay.

One process owns the directory at a time (an flock on ``journal/lock``).
Every method that touches the disk blocks and runs in a thread, except
``open``, which the service calls once before the reactor runs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from gateway.readings import InvalidInput, Quarantined, Reading, StoreUnavailable, check_reading, is_name

FILE_MAGIC = b"TXGJRNL1"
MARK = b"\xa5\x5aJR"
HEADER = struct.Struct(">4sII")
SEGMENT_BYTES = 4 * 1024 * 1024
MAX_RECORD = 256 * 1024 * 1024
SUFFIX = ".seg"


class JournalError(Exception):
    """The journal directory cannot be used (locked by another process, not writable)."""


class JournalFull(StoreUnavailable):
    """The database is away and the journal holds all it may: the device keeps its data and retries."""

    code = "journal_full"
    retry_after = 30


@dataclass(frozen=True)
class Record:
    device_id: int
    device: str
    source: str
    readings: tuple[Reading, ...]
    payload: bytes  # as stored, for the rejected-input table if the database refuses it
    quarantined: tuple[Quarantined, ...] = ()


@dataclass
class Scan:
    records: list[Record] = field(default_factory=list)
    damaged: list[tuple[int, bytes]] = field(default_factory=list)  # (offset, bytes) of each damaged region
    torn: int = 0  # bytes of a torn last write, dropped


def encode(
    device_id: int, device: str, source: str, readings: Sequence[Reading], quarantined: Sequence[Quarantined] = ()
) -> bytes:
    doc: dict[str, Any] = {"d": device_id, "n": device, "s": source, "r": readings}
    if quarantined:
        doc["q"] = [(*q.reading, q.rule) for q in quarantined]
    payload = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    return HEADER.pack(MARK, len(payload), zlib.crc32(payload)) + payload


def decode(payload: bytes) -> Record:
    """A record's payload → Record; ValueError if it is not one of ours."""
    doc = json.loads(payload)
    if not isinstance(doc, dict) or not ({"d", "n", "s", "r"} <= doc.keys() <= {"d", "n", "s", "r", "q"}):
        raise ValueError("not a journal record")
    device_id, device, source, items = doc["d"], doc["n"], doc["s"], doc["r"]
    held = doc.get("q", [])
    if not (
        isinstance(device_id, int)
        and is_name(device)
        and isinstance(source, str)
        and isinstance(items, list)
        and isinstance(held, list)
    ):
        raise ValueError("not a journal record")
    readings = tuple(_reading(item, f"r[{i}]") for i, item in enumerate(items))
    quarantined = []
    for i, item in enumerate(held):
        if not (isinstance(item, list) and len(item) == 4 and isinstance(item[3], str) and item[3]):
            raise ValueError(f"q[{i}] is not [metric, ts_us, value, rule]")
        quarantined.append(Quarantined(i, _reading(item[:3], f"q[{i}]"), item[3]))
    return Record(device_id, device, source, readings, payload, tuple(quarantined))


def _reading(item: Any, where: str) -> Reading:
    if not (isinstance(item, list) and len(item) == 3 and isinstance(item[1], int)):
        raise ValueError(f"{where} is not [metric, ts_us, value]")
    metric, ts_us, value = item
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{where} has no numeric value")
    try:
        return check_reading(metric, ts_us, float(value), where)
    except InvalidInput as e:
        raise ValueError(e.message) from None


def _record_at(data: bytes | memoryview, pos: int) -> tuple[Record, int] | None:
    """The valid record starting at ``pos`` and where the next begins, or None."""
    if len(data) - pos < HEADER.size:
        return None
    mark, length, crc = HEADER.unpack_from(data, pos)
    end = pos + HEADER.size + length
    if mark != MARK or length > MAX_RECORD or end > len(data):
        return None
    payload = bytes(data[pos + HEADER.size : end])
    if zlib.crc32(payload) != crc:
        return None
    try:
        return decode(payload), end
    except ValueError:
        return None


def scan(data: bytes, last_write: bool) -> Scan:
    """
    A segment's records in order, and its damage. ``last_write``: this
    segment was being written when its process ended, so damage running to
    its end is a torn write.
    """
    out = Scan()
    if not data.startswith(FILE_MAGIC):
        if len(data) < len(FILE_MAGIC) and FILE_MAGIC.startswith(data) and last_write:
            out.torn = len(data)  # created, header not yet synced
            return out
        pos = 0
    else:
        pos = len(FILE_MAGIC)
    view = memoryview(data)
    bad_from: int | None = None if pos else 0
    while pos < len(data):
        found = _record_at(view, pos)
        if found is not None:
            if bad_from is not None:
                out.damaged.append((bad_from, data[bad_from:pos]))
                bad_from = None
            out.records.append(found[0])
            pos = found[1]
            continue
        if bad_from is None:
            bad_from = pos
        following = data.find(MARK, pos + 1)
        pos = following if following >= 0 else len(data)
    if bad_from is not None:
        if last_write:
            out.torn = len(data) - bad_from
        else:
            out.damaged.append((bad_from, data[bad_from:]))
    return out


def parse_size(value: Any) -> int:
    """Bytes: a whole number, or one with K, M, G or T (powers of 1024): '512M', '2G'."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip().upper().removesuffix("B")
        scale = 1
        for i, unit in enumerate("KMGT", start=1):
            if text.endswith(unit):
                scale, text = 1024**i, text[:-1]
                break
        try:
            number = int(float(text) * scale)
        except ValueError:
            raise ValueError(f"{value!r} is not a size such as 1073741824, 512M or 2G") from None
    if number < 0:
        raise ValueError(f"{value!r} is negative")
    return number


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        *,
        in_thread: Callable[..., Deferred],
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        self.directory = Path(directory)
        self.damaged_dir = self.directory / "damaged"
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._in_thread = in_thread
        self._lock_fd: int | None = None
        self._sizes: dict[Path, int] = {}  # segment → bytes on disk, oldest first
        self._next = 1
        self._last_write: Path | None = None  # the previous run's last segment (may end torn)
        # the segment being appended to; touched by the flush thread only while _flushing
        self._fd: int | None = None
        self._active: Path | None = None
        self._seal = False
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._waiters: list[Deferred] = []
        self._flushing = False
        self._idle: list[Deferred] = []
        self._truncated: tuple[Path, int] | None = None  # set by a failed write
        self._closed = False
        self.full = False  # the last append was refused for want of room
        # counters, for /metrics and the console
        self.appended_records = 0
        self.fsyncs = 0
        self.damaged_regions = 0
        self.damaged_bytes = 0
        self.torn_bytes = 0

    # -- opening -----------------------------------------------------------

    def open(self) -> None:
        """Create and lock the directory, find the segments left by earlier runs. Blocks."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise JournalError(f"cannot use {str(self.directory)!r}: {e.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock_fd)
            self._lock_fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise JournalError(f"{str(self.directory)!r} is in use by another gateway process") from None
            raise JournalError(f"cannot lock {str(self.directory)!r}: {e.strerror}") from None
        found = sorted(p for p in self.directory.iterdir() if p.suffix == SUFFIX and p.stem.isdigit())
        self._sizes = {p: p.stat().st_size for p in found}
        if found:
            self._last_write = found[-1]
            self._next = int(found[-1].stem) + 1

    def close(self) -> Deferred:
        """Take no more appends; close the active segment and the lock once the last flush is done."""
        self._closed = True
        d: Deferred = Deferred()
        if self._flushing or self._pending:
            self._idle.append(d)
        else:
            d.callback(None)

        def release(_: Any) -> None:
            self._close_active()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

        return d.addCallback(release)

    # -- state -------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes on disk plus bytes waiting for the next flush."""
        return sum(self._sizes.values()) + self._pending_bytes

    @property
    def segments(self) -> int:
        return len(self._sizes)

    def has_room(self, size: int) -> bool:
        return self.size + size <= self.max_bytes

    def sealed(self) -> list[Path]:
        """Segments no longer appended to, oldest first: the ones replay may read and remove."""
        return [p for p in self._sizes if p != self._active]

    def seal(self) -> None:
        """Append to a new segment from now on, so the current one can be replayed."""
        if self._active is None:
            return
        if self._flushing:
            self._seal = True
        else:
            self._close_active()

    def _close_active(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._active = None
        self._seal = False

    # -- appending ---------------------------------------------------------

    def append(self, record: bytes) -> Deferred:
        """Queue an encoded record; fires once it is on disk (fsync'd)."""
        if self._closed:
            return fail(StoreUnavailable("the gateway is shutting down"))
        if not self.has_room(len(record)):
            self.full = True
            return fail(
                JournalFull(
                    f"the database is unavailable and the journal is full ({self.size} of {self.max_bytes} bytes)"
                )
            )
        self.full = False
        self._pending.append(record)
        self._pending_bytes += len(record)
        d: Deferred = Deferred()
        self._waiters.append(d)
        self._flush()
        return d

    def _flush(self) -> None:
        if self._flushing or not self._pending:
            return
        self._flushing = True
        data = b"".join(self._pending)
        waiters, count = self._waiters, len(self._pending)
        self._pending, self._waiters = [], []
        # The bytes in flight stay in _pending_bytes (counted against the bound) until written.
        self._in_thread(self._write, data).addBoth(self._flushed, waiters, count, len(data))

    def _write(self, data: bytes) -> tuple[Path, int]:
        """In a thread: append data to the active segment (a new one if due) and fsync it."""
        if self._fd is not None and self._active is not None:
            if self._seal or self._sizes.get(self._active, 0) >= self.segment_bytes:
                self._close_active()
        if self._fd is None or self._active is None:
            path = self.directory / f"{self._next:020d}{SUFFIX}"
            self._next += 1
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            try:
                _write_all(fd, FILE_MAGIC)
                os.fsync(fd)
                _fsync_dir(self.directory)
            except OSError:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            self._fd, self._active = fd, path
            base = len(FILE_MAGIC)
        else:
            fd, path = self._fd, self._active
            base = self._sizes[path]
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError:
            # Leave no half record behind: the next flush starts a fresh segment.
            try:
                os.ftruncate(fd, base)
                os.fsync(fd)
            except OSError:
                pass
            self._fd, self._active = None, None
            os.close(fd)
            if base == len(FILE_MAGIC):
                path.unlink(missing_ok=True)
            else:
                self._truncated = (path, base)
            raise
        return path, base + len(data)

    def _flushed(self, result: Any, waiters: list[Deferred], count: int, size: int) -> None:
        self._pending_bytes -= size
        self._flushing = False
        truncated = self._truncated
        if truncated is not None:
            self._sizes[truncated[0]] = truncated[1]
            self._truncated = None
        if isinstance(result, Failure):
            cause = result.value
            if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
                # The disk, not the bound, is full: the same answer, and /healthz says so until a write fits.
                self.full = True
                error: StoreUnavailable = JournalFull(
                    f"the database is unavailable and the journal's disk is full ({self.directory}); nothing of "
                    "this write was acknowledged"
                )
            else:
                error = StoreUnavailable(f"the database is unavailable and the journal cannot be written: {cause}")
            for d in waiters:
                d.errback(Failure(error))
        else:
            path, new_size = result
            self._sizes[path] = new_size
            self.full = False
            self.appended_records += count
            self.fsyncs += 1
            if self._seal:
                self._close_active()
            for d in waiters:
                d.callback(None)
        self._flush()
        if not self._flushing and not self._pending:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    # -- reading back ------------------------------------------------------

    def read(self, path: Path) -> Deferred:
        """Fire with the Scan of a sealed segment; damaged regions are moved aside first."""
        return self._in_thread(self._read, path)

    def _read(self, path: Path) -> Scan:
        data = path.read_bytes()
        result = scan(data, last_write=path == self._last_write)
        if result.damaged:
            self.damaged_dir.mkdir(mode=0o700, exist_ok=True)
            for offset, region in result.damaged:
                aside = self.damaged_dir / f"{path.stem}-{offset}.bad"
                fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    _write_all(fd, region)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(self.damaged_dir)
        return result

    def counted(self, result: Scan) -> None:
        """Add a scan's damage to the counters (on the reactor thread)."""
        self.damaged_regions += len(result.damaged)
        self.damaged_bytes += sum(len(region) for _, region in result.damaged)
        self.torn_bytes += result.torn

    def remove(self, path: Path) -> Deferred:
        """Delete a replayed segment (and fsync the directory)."""

        def unlink() -> None:
            path.unlink(missing_ok=True)
            _fsync_dir(self.directory)

        def removed(_: Any) -> None:
            self.full = False
            self._sizes.pop(path, None)
            if path == self._last_write:
                self._last_write = None

        return self._in_thread(unlink).addCallback(removed)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
