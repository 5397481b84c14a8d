"""The results directory: claims, per-item records, logs and outputs.

Layout (all under `results/`):

    claims/<item>.claim       who works on an item now (created with O_CREAT|O_EXCL; mtime is
                              the heartbeat); once the item is finished, a tombstone in its
                              place (state done or failed) that is never removed or taken over
    done/<item>.json          the item finished (published with link(), so exactly once)
    failed/<item>.json        the item failed `retries + 1` times; it is not tried again
    items/<item>/input.fasta  the item's own FASTA file ({fasta})
    items/<item>/out/         its output directory ({outdir})
    items/<item>/logs/attempt-<n>.log / .json   output and outcome of every attempt
    items/<item>/stages/<stage>.done            stages already finished (a retry resumes after)
    items/<item>/state.json   the stage running now (for `acb-campaign status`)
    .takeover.lock            POSIX lock held while a stale claim is replaced

Claims are safe across processes and hosts sharing the directory (a Slurm job array): creating a
claim is one atomic O_EXCL open; a stale claim is replaced only under the takeover lock after
re-checking that it is still the same stale claim.

A finished item's claim stays as a tombstone: the claim file is atomically replaced by one whose
`state` is `done` or `failed`. On NFS a client may cache that `done/<item>.json` does not exist
(negative dentry caching) long after another node published it; the O_EXCL create of the claim
is decided by the server, so it fails for a finished item whatever the client caches, and the
item is never run twice. `reset-failed` removes the tombstones of the items it resets; to run a
done item again, remove both `done/<item>.json` and `claims/<item>.claim`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acb_slurm.campaign.attempts import Attempt, Outcome
from acb_slurm.campaign.items import Item

__all__ = [
    "Attempt",
    "Claim",
    "ClaimInfo",
    "ClaimState",
    "Outcome",
    "ResultsStore",
    "WorkerIdentity",
    "proc_stat_fields",
    "process_start_time",
]


class ClaimState(enum.StrEnum):
    """What a claim file says about its item: a worker runs it now, or it is finished (a
    tombstone, kept for good)."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


def proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (Linux; index 0 = state, 1 = ppid,
    16 = nice, 19 = start time), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return stat[stat.rfind(")") + 2 :].split()


def process_start_time(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux), or None if it is gone.

    Stored with a claim so that a reused pid is not mistaken for the claiming worker.
    """
    fields = proc_stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def _publish_once(path: Path, data: dict[str, Any]) -> bool:
    """Write `path` with complete content, only if it does not exist yet (link is atomic)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    """Who claims: written into every claim so others can judge whether it is still alive."""

    name: str
    host: str
    pid: int
    pid_start: str | None
    array_task: str = ""

    @classmethod
    def current(cls, name: str, array_task: str = "") -> WorkerIdentity:
        """This process, named `name`."""
        pid = os.getpid()
        return cls(name, socket.gethostname(), pid, process_start_time(pid), array_task)


@dataclass(frozen=True, slots=True)
class Claim:
    """A claim held by this process on one item."""

    item_id: str
    path: Path
    token: str


@dataclass(frozen=True, slots=True)
class ClaimInfo:
    """What a claim file says, as seen by anyone (for liveness and status)."""

    item_id: str
    data: dict[str, Any]
    mtime: float
    inode: int

    @property
    def state(self) -> ClaimState:
        """RUNNING for a live claim (or one still being written), else the tombstone's state."""
        try:
            return ClaimState(self.data.get("state", ClaimState.RUNNING))
        except ValueError:
            return ClaimState.RUNNING

    @property
    def finished(self) -> bool:
        """A tombstone: the item is done or failed for good."""
        return self.state is not ClaimState.RUNNING


class ResultsStore:
    """Everything a worker or `status` reads and writes in the results directory."""

    def __init__(self, root: Path, stale_after_s: float = 600.0) -> None:
        self.root = Path(root)
        self.stale_after_s = stale_after_s
        self.claims_dir = self.root / "claims"
        self.done_dir = self.root / "done"
        self.failed_dir = self.root / "failed"
        self.items_dir = self.root / "items"

    def create(self) -> None:
        """Make the directories (idempotent)."""
        for directory in (self.claims_dir, self.done_dir, self.failed_dir, self.items_dir):
            directory.mkdir(parents=True, exist_ok=True)

    # ---- paths ----

    def claim_path(self, item_id: str) -> Path:
        return self.claims_dir / f"{item_id}.claim"

    def done_path(self, item_id: str) -> Path:
        return self.done_dir / f"{item_id}.json"

    def failed_path(self, item_id: str) -> Path:
        return self.failed_dir / f"{item_id}.json"

    def item_dir(self, item_id: str) -> Path:
        return self.items_dir / item_id

    def outdir(self, item_id: str) -> Path:
        return self.item_dir(item_id) / "out"

    def logs_dir(self, item_id: str) -> Path:
        return self.item_dir(item_id) / "logs"

    def stage_marker(self, item_id: str, stage: str) -> Path:
        return self.item_dir(item_id) / "stages" / f"{stage}.done"

    # ---- terminal records ----

    def is_finished(self, item_id: str) -> bool:
        """Done or failed for good: no worker should start it again. (On NFS a record published
        elsewhere may not be visible yet; the claim's tombstone still stops a second run.)"""
        return self.finished_state(item_id) is not None

    def finished_state(self, item_id: str) -> ClaimState | None:
        """DONE or FAILED when the item's done or failed record exists, else None."""
        if self.done_path(item_id).exists():
            return ClaimState.DONE
        if self.failed_path(item_id).exists():
            return ClaimState.FAILED
        return None

    def record_done(self, item_id: str, data: dict[str, Any]) -> bool:
        """Publish the done record; False if one already existed (it is never overwritten)."""
        return _publish_once(self.done_path(item_id), data)

    def record_failed(self, item_id: str, data: dict[str, Any]) -> bool:
        """Publish the failed record; False if one already existed."""
        return _publish_once(self.failed_path(item_id), data)

    def done_records(self) -> dict[str, dict[str, Any]]:
        """Done records by item id."""
        return self._records(self.done_dir)

    def failed_records(self) -> dict[str, dict[str, Any]]:
        """Failed records by item id."""
        return self._records(self.failed_dir)

    def _records(self, directory: Path) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for path in self._entries(directory, ".json"):
            data = _read_json(path)
            if data is not None:
                out[path.stem] = data
        return out

    def _entries(self, directory: Path, suffix: str) -> list[Path]:
        try:
            with os.scandir(directory) as it:
                return [
                    Path(e.path)
                    for e in it
                    if e.name.endswith(suffix) and not e.name.startswith(".")
                ]
        except FileNotFoundError:
            return []

    def counts(self) -> tuple[set[str], set[str], set[str]]:
        """Ids of (done, failed, claimed) items, from directory listings only (cheap)."""
        done = {p.stem for p in self._entries(self.done_dir, ".json")}
        failed = {p.stem for p in self._entries(self.failed_dir, ".json")}
        claimed = {p.stem for p in self._entries(self.claims_dir, ".claim")}
        return done, failed, claimed

    def done_times(self) -> list[float]:
        """Modification times of the done records (when items finished), sorted."""
        times = []
        for path in self._entries(self.done_dir, ".json"):
            with contextlib.suppress(FileNotFoundError):
                times.append(path.stat().st_mtime)
        return sorted(times)

    def reset_failed(self) -> list[str]:
        """Forget the failed records (and their attempt counts) so the items are tried again."""
        reset = []
        for path in self._entries(self.failed_dir, ".json"):
            item_id = path.stem
            logs = self.logs_dir(item_id)
            for record in logs.glob("attempt-*.json") if logs.is_dir() else []:
                data = _read_json(record) or {}
                try:
                    attempt = Attempt.from_json(data)
                except ValueError:  # not a record this version reads: mark it all the same
                    if data.get("outcome") != Outcome.INTERRUPTED:
                        data["outcome"] = Outcome.INTERRUPTED.value
                        data["reset"] = True
                        _write_json_atomic(record, data)
                    continue
                if attempt.outcome is not Outcome.INTERRUPTED:
                    undone = dataclasses.replace(attempt, outcome=Outcome.INTERRUPTED, reset=True)
                    _write_json_atomic(record, undone.to_json())
            path.unlink(missing_ok=True)
            # The failed tombstone goes too, or no worker could claim the item again.
            info = self.read_claim(item_id)
            if info is not None and info.state is ClaimState.FAILED:
                self.claim_path(item_id).unlink(missing_ok=True)
            reset.append(item_id)
        return sorted(reset)

    # ---- claims ----

    def try_claim(self, item_id: str, me: WorkerIdentity) -> Claim | None:
        """Claim an item with one atomic O_EXCL create; None if someone else holds it."""
        path = self.claim_path(item_id)
        token = secrets.token_hex(8)
        data = {
            "item": item_id,
            "worker": me.name,
            "host": me.host,
            "pid": me.pid,
            "pid_start": me.pid_start,
            "array_task": me.array_task,
            "token": token,
            "claimed_at": time.time(),
            "state": ClaimState.RUNNING.value,
        }
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
            fh.write("\n")
        return Claim(item_id, path, token)

    def read_claim(self, item_id: str) -> ClaimInfo | None:
        """The claim of an item as it is now, or None when unclaimed."""
        path = self.claim_path(item_id)
        try:
            st = path.stat()
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text) if text.strip() else {}
        except ValueError:
            data = {}
        return ClaimInfo(item_id, data if isinstance(data, dict) else {}, st.st_mtime, st.st_ino)

    def is_stale(self, info: ClaimInfo, now: float | None = None) -> bool:
        """A claim is stale when its worker is gone: on this host, its pid no longer runs (or is
        another process); elsewhere, its heartbeat (the file's mtime) is older than stale_after.
        A tombstone (finished item) is never stale."""
        if info.finished:
            return False
        now = time.time() if now is None else now
        data = info.data
        if data.get("host") == socket.gethostname() and isinstance(data.get("pid"), int):
            start = process_start_time(data["pid"])
            if start is None:
                return True
            return bool(data.get("pid_start") is not None and start != data["pid_start"])
        # Other host, or a claim still being written: only the heartbeat can tell.
        return now - info.mtime > self.stale_after_s

    def still_mine(self, claim: Claim) -> bool:
        """Whether our claim is still in place and live (not released, taken over or turned
        into a tombstone)."""
        info = self.read_claim(claim.item_id)
        return info is not None and not info.finished and info.data.get("token") == claim.token

    def heartbeat(self, claim: Claim) -> bool:
        """Touch the claim (its mtime is the heartbeat); False when it is no longer ours."""
        if not self.still_mine(claim):
            return False
        with contextlib.suppress(FileNotFoundError):
            os.utime(claim.path)
        return True

    def release(self, claim: Claim) -> None:
        """Drop our claim (only if it is still ours) of an item that is not finished, so that
        another worker may run it. A finished item's claim is never removed: see `finish`."""
        if self.still_mine(claim):
            claim.path.unlink(missing_ok=True)

    def finish(self, claim: Claim, state: ClaimState, me: WorkerIdentity) -> None:
        """Turn the claim of a finished item (its done or failed record is published) into a
        tombstone, atomically and for good, so that no O_EXCL create can claim it again.

        Written whoever holds the claim now: the item is finished, so a worker that took it over
        meanwhile would only run it a second time (its heartbeat finds the claim lost)."""
        if state is ClaimState.RUNNING:
            raise ValueError("a tombstone is DONE or FAILED")
        _write_json_atomic(
            claim.path,
            {
                "item": claim.item_id,
                "state": state.value,
                "worker": me.name,
                "host": me.host,
                "pid": me.pid,
                "array_task": me.array_task,
                "finished_at": time.time(),
            },
        )

    @contextlib.contextmanager
    def _takeover_lock(self) -> Iterator[None]:
        fd = os.open(self.root / ".takeover.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
            os.close(fd)

    def take_over(self, seen: ClaimInfo, me: WorkerIdentity) -> Claim | None:
        """Replace a stale claim by ours. Under the takeover lock, the claim is re-read: only if
        it is the same file (inode, content) and still stale is it removed and ours created.
        A tombstone is never stale, so it is never taken over."""
        with self._takeover_lock():
            now_info = self.read_claim(seen.item_id)
            if now_info is None:
                return self.try_claim(seen.item_id, me)
            if (
                now_info.inode != seen.inode
                or now_info.data != seen.data
                or not self.is_stale(now_info)
            ):
                return None
            self.claim_path(seen.item_id).unlink(missing_ok=True)
            return self.try_claim(seen.item_id, me)

    # ---- attempts and stages ----

    def attempts(self, item_id: str) -> list[dict[str, Any]]:
        """Attempt records of an item as their JSON says, oldest first (see `attempt_records`
        for them typed)."""
        logs = self.logs_dir(item_id)
        records = []
        for path in logs.glob("attempt-*.json") if logs.is_dir() else []:
            data = _read_json(path)
            if data is not None:
                records.append(data)
        return sorted(records, key=lambda r: int(r.get("attempt", 0)))

    def attempt_records(self, item_id: str) -> list[Attempt]:
        """Attempt records of an item, oldest first; a file that is no attempt record (not
        written by a worker) is left out."""
        records = []
        for data in self.attempts(item_id):
            with contextlib.suppress(ValueError):
                records.append(Attempt.from_json(data))
        return records

    def write_attempt(self, item_id: str, record: Attempt) -> None:
        """Write (or rewrite) an attempt's record."""
        _write_json_atomic(
            self.logs_dir(item_id) / f"attempt-{record.attempt}.json", record.to_json()
        )

    def attempt_log(self, item_id: str, attempt: int) -> Path:
        return self.logs_dir(item_id) / f"attempt-{attempt}.log"

    def stage_done(self, item_id: str, stage: str) -> bool:
        return self.stage_marker(item_id, stage).exists()

    def mark_stage_done(self, item_id: str, stage: str, data: dict[str, Any]) -> None:
        """Record a finished stage, so a retry resumes after it."""
        marker = self.stage_marker(item_id, stage)
        marker.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(marker, data)

    def write_state(self, item_id: str, data: dict[str, Any]) -> None:
        """Which stage runs now (read by `acb-campaign status`)."""
        _write_json_atomic(self.item_dir(item_id) / "state.json", data)

    def read_state(self, item_id: str) -> dict[str, Any] | None:
        """The item's state record, or None."""
        return _read_json(self.item_dir(item_id) / "state.json")

    def prepare_item(self, item: Item) -> None:
        """Create the item's directories and its own FASTA file."""
        for directory in (self.outdir(item.id), self.logs_dir(item.id)):
            directory.mkdir(parents=True, exist_ok=True)
        fasta = self.item_dir(item.id) / "input.fasta"
        if not fasta.exists():
            tmp = fasta.with_name(f".input.fasta.{os.getpid()}.tmp")
            tmp.write_text(item.fasta(), encoding="utf-8")
            os.replace(tmp, fasta)
