"""What can go wrong when a client talks to its assigner, each with the assigner's own message."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # grpc is imported only where an error is translated (it costs ~40 ms)
    import grpc


class AssignerError(RuntimeError):
    """Base of the client's errors. `code` is the gRPC status when the assigner answered."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class AssignerNotConfigured(AssignerError):
    """The environment does not say where the assigner is (ACB_ASSIGNER unset)."""


class AssignerUnavailable(AssignerError):
    """The assigner cannot be reached, or it is shutting down."""


class Unauthenticated(AssignerError):
    """The assigner refused the job token (ACB_TOKEN_FILE missing or of another job)."""


class InvalidGpuRequest(AssignerError, ValueError):
    """The request is malformed (zero GPUs, negative memory, ...)."""


class GrantImpossible(AssignerError):
    """The request can never be granted on this node (more GPUs or memory than exist, ...)."""


class LeaseNotHeld(AssignerError):
    """The lease is not held (already released, never granted, or on_device_end() without one)."""


class SessionLost(AssignerError):
    """The session stream broke (assigner gone): every lease of this process was released."""


class LeaseLost(SessionLost):
    """A lease this process still meant to hold is gone: its session ended (the assigner died or
    restarted, or dropped this process as silent, e.g. while it was stopped), so the assigner
    released it and may have granted its GPUs to another process. Raised when the program ends
    (or checks) such a lease instead of releasing it as if nothing happened; the program must
    not use those GPUs any more. `lease_id` names the lease, `lease` is the `Lease` when known,
    `reason` says how the session ended."""

    def __init__(
        self,
        message: str,
        code: grpc.StatusCode | None = None,
        lease_id: str = "",
        lease: object = None,
        reason: str = "",
    ) -> None:
        super().__init__(message, code)
        self.lease_id = lease_id
        self.lease = lease
        self.reason = reason


class GangAborted(AssignerError):
    """A gang failed before it was granted: one of its members left or died, or a node's
    assigner went away (`Client.join_gang`)."""


class UnsafeAssignerSocket(AssignerError):
    """The assigner's Unix socket, or its directory, is not this user's, or others can write the
    directory: another user could be listening there, so the client does not connect (the job's
    token would go to them)."""


def from_rpc_error(exc: grpc.RpcError, what: str) -> AssignerError:
    """Turn a gRPC error into the matching AssignerError, keeping the assigner's message."""
    import grpc

    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    message = f"{what}: {details}"
    kinds: dict[grpc.StatusCode, type[AssignerError]] = {
        grpc.StatusCode.INVALID_ARGUMENT: InvalidGpuRequest,
        grpc.StatusCode.FAILED_PRECONDITION: GrantImpossible,
        grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
        grpc.StatusCode.NOT_FOUND: LeaseNotHeld,
        grpc.StatusCode.UNAVAILABLE: AssignerUnavailable,
        grpc.StatusCode.ABORTED: GangAborted,
    }
    kind = kinds.get(code, AssignerError) if code is not None else AssignerError
    return kind(message, code)
