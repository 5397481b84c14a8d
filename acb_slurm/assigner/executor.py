"""The executor role: report this node's state to the controller of a multi-node job.

The executor keeps one `Controller.Join` stream open to the controller: `join` with its
NodeStatus first, then `state` whenever holders or the queue change (at most one report per
`DEBOUNCE_S`), and a periodic refresh. If the controller is not up yet or the stream breaks, it
reconnects with backoff. Grants stay local: each node serves its own workers, except gang parts:
the controller sends `take` (hold whole GPUs for a gang's part, ahead of every local waiter,
answered with `taken` once they are held) and `drop`; every part is dropped when the link
breaks, since the controller that asked for it is gone (`acb_slurm.assigner.gangs`). The link is TLS
with the job's material (`acb_slurm.tls`: the controller must show the job's certificate, and
this executor shows it too); plaintext only when the daemon was started with --insecure-tcp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from acb_slurm import tls
from acb_slurm._proto.acb.v1 import assigner_pb2 as pb
from acb_slurm._proto.acb.v1 import assigner_pb2_grpc as pb_grpc
from acb_slurm.assigner import limits
from acb_slurm.assigner.gangs import LocalParts
from acb_slurm.assigner.leases import BookError, LeaseBook
from acb_slurm.assigner.server import node_status_message
from acb_slurm.env import TOKEN_METADATA_KEY

log = logging.getLogger(__name__)

#: Keepalive pings notice a controller whose node died (no FIN ever comes then) within ~15 s:
#: the same settings as the client's (`acb_slurm.client.session.CHANNEL_OPTIONS`), including
#: `grpc.http2.ping_timeout_ms`, without which gRPC core waits 60 s for a ping's answer.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
DEBOUNCE_S = 0.1
REFRESH_S = 5.0
RETRY_MAX_S = 5.0


class ExecutorLink:
    """The executor side of Controller.Join, running as a task on the daemon's loop."""

    def __init__(
        self,
        book: LeaseBook,
        controller: str,
        token: str | None,
        material: tls.Material | None = None,
        parts: LocalParts | None = None,
    ) -> None:
        """`material` None: plaintext (the daemon was told --insecure-tcp). `parts`: where gang
        parts are taken (this node's book)."""
        self.book = book
        self.parts = parts or LocalParts(book)
        self._takes: dict[str, asyncio.Task[None]] = {}
        self.controller = controller
        self.material = material
        self.metadata = ((TOKEN_METADATA_KEY, token),) if token else None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connected = False

    def start(self) -> None:
        self.book.change_listeners.append(self._changed.set)
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = 0.2
        while True:
            outbox: asyncio.Queue[pb.ExecutorMessage] = asyncio.Queue()
            reporter = asyncio.ensure_future(self._report(outbox))
            try:
                async with tls.aio_channel(
                    self.controller, self.material, options=CHANNEL_OPTIONS
                ) as channel:
                    stub = pb_grpc.ControllerStub(channel)
                    call = stub.Join(self._messages(outbox), metadata=self.metadata)
                    async for command in call:
                        self.connected = True
                        delay = 0.2
                        self._obey(command, outbox)
            except grpc.RpcError as exc:
                details = limits.clip(exc.details() or "", limits.MAX_ECHO * 4)
                log.warning("controller %s: %s; retrying", self.controller, details)
            finally:
                reporter.cancel()
                self._drop_all("controller-gone")
            self.connected = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    def _obey(
        self, command: pb.ControllerMessage, outbox: asyncio.Queue[pb.ExecutorMessage]
    ) -> None:
        kind = command.WhichOneof("kind")
        if kind == "take":
            take = command.take
            self._takes[take.part_id] = asyncio.ensure_future(self._take(take, outbox))
        elif kind == "drop":
            task = self._takes.pop(command.drop.part_id, None)
            if task is not None:
                task.cancel()
            self.parts.drop(command.drop.part_id, command.drop.reason or "gang-done")

    async def _take(self, take: pb.TakePart, outbox: asyncio.Queue[pb.ExecutorMessage]) -> None:
        try:
            part = await self.parts.take(take.part_id, take.gang, take.gpu_count, take.job_id)
        except BookError as exc:
            answer = pb.PartTaken(part_id=take.part_id, error=exc.message)
        except Exception as exc:  # never leave the controller without an answer
            log.exception("gang part %s: taking it failed", take.part_id)
            answer = pb.PartTaken(part_id=take.part_id, error=limits.clip(f"{exc}"))
        else:
            answer = pb.PartTaken(
                part_id=take.part_id,
                gpu_indices=part.gpu_indices,
                device_ids=part.device_ids,
                free_port=part.free_port,
            )
        finally:
            self._takes.pop(take.part_id, None)
        outbox.put_nowait(pb.ExecutorMessage(taken=answer))

    def _drop_all(self, reason: str) -> None:
        for task in self._takes.values():
            task.cancel()
        self._takes.clear()
        self.parts.drop_all(reason)

    async def _report(self, outbox: asyncio.Queue[pb.ExecutorMessage]) -> None:
        """This node's state, whenever it changes (debounced) and every REFRESH_S."""
        outbox.put_nowait(pb.ExecutorMessage(join=node_status_message(self.book.node_status())))
        while True:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), REFRESH_S)
            await asyncio.sleep(DEBOUNCE_S)
            outbox.put_nowait(
                pb.ExecutorMessage(state=node_status_message(self.book.node_status()))
            )

    @staticmethod
    async def _messages(
        outbox: asyncio.Queue[pb.ExecutorMessage],
    ) -> AsyncIterator[pb.ExecutorMessage]:
        while True:
            yield await outbox.get()
