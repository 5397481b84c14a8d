"""The assigner's event log: JSON lines, append-only, one object per event.

Every line carries `ts` (Unix seconds), `event` and `node` (docs/ARCHITECTURE.md lists the events
and their fields). `emit` only buffers; the daemon calls `flush()` at the end of each operation,
before it answers the client, so one operation (a release and the grant it makes possible) costs
one write system call, and a client that got an answer finds its lines in the file. A line emitted
outside such an operation (`batching` is 0) gets a flush scheduled on the event loop as a safety
net, and `close()` writes whatever is left.

The log is private (0600, its directory made 0700 when missing): it names the job's sessions,
workers and labels. An existing log of this user is made 0600 too.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from typing import IO, Any

_encoder = json.JSONEncoder(separators=(",", ":"))


def create_private(path: str | os.PathLike[str], exclusive: bool = False) -> IO[str]:
    """Open `path` for writing, readable by this user only: created 0600 (whatever the umask),
    or, if it exists and is this user's, made 0600. `exclusive`: a new file only (never one
    already there, nor what a symbolic link there names); else appended to."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    flags |= os.O_EXCL if exclusive else os.O_APPEND
    fd = os.open(path, flags, 0o600)
    try:
        info = os.fstat(fd)
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, stat.S_IMODE(info.st_mode) & 0o700)
        return open(fd, "a" if not exclusive else "w", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def _encode(record: dict[str, Any]) -> str:
    """One JSON line (a reused encoder: half the cost of json.dumps with options)."""
    return _encoder.encode(record) + "\n"


class EventLog:
    """Append-only JSON-lines writer; without a path it only keeps nothing (events are dropped)."""

    def __init__(self, path: str | os.PathLike[str] | None, node: str) -> None:
        self.node = node
        self._file: IO[str] | None = None
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
            self._file = create_private(path)  # closed by close()
        self._pending: list[str] = []
        self._flush_scheduled = False
        #: Operations in progress that flush when they end (no safety-net flush is scheduled).
        self.batching = 0

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def emit(self, event: str, **fields: Any) -> None:
        """Record one event now; it reaches the file at the end of this event-loop turn."""
        if self._file is None:
            return
        record = {"ts": time.time(), "event": event, "node": self.node, **fields}
        self._pending.append(_encode(record))
        if self._flush_scheduled or self.batching:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write and flush every buffered line."""
        self._flush_scheduled = False
        if self._file is None or not self._pending:
            return
        lines, self._pending = self._pending, []
        self._file.write("".join(lines))
        self._file.flush()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
