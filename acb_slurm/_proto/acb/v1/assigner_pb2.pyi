from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClientIdentity(_message.Message):
    __slots__ = ("client_id", "job_id", "worker", "pid", "hostname")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    job_id: str
    worker: str
    pid: int
    hostname: str
    def __init__(self, client_id: _Optional[str] = ..., job_id: _Optional[str] = ..., worker: _Optional[str] = ..., pid: _Optional[int] = ..., hostname: _Optional[str] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("register", "usage", "yield_done")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    YIELD_DONE_FIELD_NUMBER: _ClassVar[int]
    register: ClientIdentity
    usage: UsageReport
    yield_done: YieldDone
    def __init__(self, register: _Optional[_Union[ClientIdentity, _Mapping]] = ..., usage: _Optional[_Union[UsageReport, _Mapping]] = ..., yield_done: _Optional[_Union[YieldDone, _Mapping]] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("registered", "grant", "yield_request", "gang_ended")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    YIELD_REQUEST_FIELD_NUMBER: _ClassVar[int]
    GANG_ENDED_FIELD_NUMBER: _ClassVar[int]
    registered: Registered
    grant: GrantNotice
    yield_request: YieldRequest
    gang_ended: GangEnded
    def __init__(self, registered: _Optional[_Union[Registered, _Mapping]] = ..., grant: _Optional[_Union[GrantNotice, _Mapping]] = ..., yield_request: _Optional[_Union[YieldRequest, _Mapping]] = ..., gang_ended: _Optional[_Union[GangEnded, _Mapping]] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("session_id", "node", "policy", "session_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    node: str
    policy: str
    session_key: str
    def __init__(self, session_id: _Optional[str] = ..., node: _Optional[str] = ..., policy: _Optional[str] = ..., session_key: _Optional[str] = ...) -> None: ...

class UsageReport(_message.Message):
    __slots__ = ("lease_id", "resident_bytes")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    resident_bytes: int
    def __init__(self, lease_id: _Optional[str] = ..., resident_bytes: _Optional[int] = ...) -> None: ...

class GrantNotice(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: AllocReply
    def __init__(self, lease: _Optional[_Union[AllocReply, _Mapping]] = ...) -> None: ...

class YieldRequest(_message.Message):
    __slots__ = ("lease_id", "reason")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    reason: str
    def __init__(self, lease_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class YieldDone(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class AllocRequest(_message.Message):
    __slots__ = ("session_id", "gpu_count", "memory_bytes", "priority", "label", "request_tag", "required_gpu_indices", "session_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TAG_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    gpu_count: int
    memory_bytes: int
    priority: int
    label: str
    request_tag: str
    required_gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    session_key: str
    def __init__(self, session_id: _Optional[str] = ..., gpu_count: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., priority: _Optional[int] = ..., label: _Optional[str] = ..., request_tag: _Optional[str] = ..., required_gpu_indices: _Optional[_Iterable[int]] = ..., session_key: _Optional[str] = ...) -> None: ...

class AllocReply(_message.Message):
    __slots__ = ("lease_id", "gpu_indices", "device_ids", "memory_bytes", "node", "waited_seconds", "request_tag")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    WAITED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TAG_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    memory_bytes: int
    node: str
    waited_seconds: float
    request_tag: str
    def __init__(self, lease_id: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., device_ids: _Optional[_Iterable[str]] = ..., memory_bytes: _Optional[int] = ..., node: _Optional[str] = ..., waited_seconds: _Optional[float] = ..., request_tag: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_id", "lease_id", "reason", "session_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    lease_id: str
    reason: str
    session_key: str
    def __init__(self, session_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., reason: _Optional[str] = ..., session_key: _Optional[str] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GangJoin(_message.Message):
    __slots__ = ("session_id", "session_key", "gang", "node_count", "gpus_per_node", "node", "priority", "label")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    GANG_FIELD_NUMBER: _ClassVar[int]
    NODE_COUNT_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    session_key: str
    gang: str
    node_count: int
    gpus_per_node: int
    node: str
    priority: int
    label: str
    def __init__(self, session_id: _Optional[str] = ..., session_key: _Optional[str] = ..., gang: _Optional[str] = ..., node_count: _Optional[int] = ..., gpus_per_node: _Optional[int] = ..., node: _Optional[str] = ..., priority: _Optional[int] = ..., label: _Optional[str] = ...) -> None: ...

class GangPart(_message.Message):
    __slots__ = ("node", "gpu_indices", "device_ids", "address")
    NODE_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    address: str
    def __init__(self, node: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., device_ids: _Optional[_Iterable[str]] = ..., address: _Optional[str] = ...) -> None: ...

class GangGrant(_message.Message):
    __slots__ = ("gang", "lease_id", "node_rank", "parts", "master_addr", "master_port", "waited_seconds")
    GANG_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_RANK_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    MASTER_ADDR_FIELD_NUMBER: _ClassVar[int]
    MASTER_PORT_FIELD_NUMBER: _ClassVar[int]
    WAITED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    gang: str
    lease_id: str
    node_rank: int
    parts: _containers.RepeatedCompositeFieldContainer[GangPart]
    master_addr: str
    master_port: int
    waited_seconds: float
    def __init__(self, gang: _Optional[str] = ..., lease_id: _Optional[str] = ..., node_rank: _Optional[int] = ..., parts: _Optional[_Iterable[_Union[GangPart, _Mapping]]] = ..., master_addr: _Optional[str] = ..., master_port: _Optional[int] = ..., waited_seconds: _Optional[float] = ...) -> None: ...

class GangLeave(_message.Message):
    __slots__ = ("session_id", "session_key", "lease_id", "exit_status", "reason", "stopping")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    session_key: str
    lease_id: str
    exit_status: int
    reason: str
    stopping: bool
    def __init__(self, session_id: _Optional[str] = ..., session_key: _Optional[str] = ..., lease_id: _Optional[str] = ..., exit_status: _Optional[int] = ..., reason: _Optional[str] = ..., stopping: _Optional[bool] = ...) -> None: ...

class GangLeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GangEnded(_message.Message):
    __slots__ = ("gang", "lease_id", "reason")
    GANG_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    gang: str
    lease_id: str
    reason: str
    def __init__(self, gang: _Optional[str] = ..., lease_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GangStatus(_message.Message):
    __slots__ = ("gang", "state", "node_count", "gpus_per_node", "members", "parts", "seconds", "label", "priority")
    GANG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NODE_COUNT_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    gang: str
    state: str
    node_count: int
    gpus_per_node: int
    members: _containers.RepeatedScalarFieldContainer[str]
    parts: _containers.RepeatedCompositeFieldContainer[GangPart]
    seconds: float
    label: str
    priority: int
    def __init__(self, gang: _Optional[str] = ..., state: _Optional[str] = ..., node_count: _Optional[int] = ..., gpus_per_node: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., parts: _Optional[_Iterable[_Union[GangPart, _Mapping]]] = ..., seconds: _Optional[float] = ..., label: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GpuStatus(_message.Message):
    __slots__ = ("index", "device_id", "uuid", "name", "memory_bytes", "promised_bytes", "lease_ids", "lease_ids_omitted")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROMISED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_IDS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    index: int
    device_id: str
    uuid: str
    name: str
    memory_bytes: int
    promised_bytes: int
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    lease_ids_omitted: int
    def __init__(self, index: _Optional[int] = ..., device_id: _Optional[str] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., promised_bytes: _Optional[int] = ..., lease_ids: _Optional[_Iterable[str]] = ..., lease_ids_omitted: _Optional[int] = ...) -> None: ...

class LeaseStatus(_message.Message):
    __slots__ = ("lease_id", "client", "gpu_indices", "memory_bytes", "held_seconds", "label")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HELD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    client: ClientIdentity
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    memory_bytes: int
    held_seconds: float
    label: str
    def __init__(self, lease_id: _Optional[str] = ..., client: _Optional[_Union[ClientIdentity, _Mapping]] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., memory_bytes: _Optional[int] = ..., held_seconds: _Optional[float] = ..., label: _Optional[str] = ...) -> None: ...

class WaiterStatus(_message.Message):
    __slots__ = ("client", "gpu_count", "memory_bytes", "priority", "waiting_seconds", "label", "required_gpu_indices")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    WAITING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    client: ClientIdentity
    gpu_count: int
    memory_bytes: int
    priority: int
    waiting_seconds: float
    label: str
    required_gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, client: _Optional[_Union[ClientIdentity, _Mapping]] = ..., gpu_count: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., priority: _Optional[int] = ..., waiting_seconds: _Optional[float] = ..., label: _Optional[str] = ..., required_gpu_indices: _Optional[_Iterable[int]] = ...) -> None: ...

class Counters(_message.Message):
    __slots__ = ("requests", "grants", "releases", "yields", "disconnects", "errors", "sessions")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    YIELDS_FIELD_NUMBER: _ClassVar[int]
    DISCONNECTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    requests: int
    grants: int
    releases: int
    yields: int
    disconnects: int
    errors: int
    sessions: int
    def __init__(self, requests: _Optional[int] = ..., grants: _Optional[int] = ..., releases: _Optional[int] = ..., yields: _Optional[int] = ..., disconnects: _Optional[int] = ..., errors: _Optional[int] = ..., sessions: _Optional[int] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node", "address", "policy", "gpus", "leases", "queue", "counters", "uptime_seconds", "leases_omitted", "queue_omitted")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEASES_OMITTED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_OMITTED_FIELD_NUMBER: _ClassVar[int]
    node: str
    address: str
    policy: str
    gpus: _containers.RepeatedCompositeFieldContainer[GpuStatus]
    leases: _containers.RepeatedCompositeFieldContainer[LeaseStatus]
    queue: _containers.RepeatedCompositeFieldContainer[WaiterStatus]
    counters: Counters
    uptime_seconds: float
    leases_omitted: int
    queue_omitted: int
    def __init__(self, node: _Optional[str] = ..., address: _Optional[str] = ..., policy: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[GpuStatus, _Mapping]]] = ..., leases: _Optional[_Iterable[_Union[LeaseStatus, _Mapping]]] = ..., queue: _Optional[_Iterable[_Union[WaiterStatus, _Mapping]]] = ..., counters: _Optional[_Union[Counters, _Mapping]] = ..., uptime_seconds: _Optional[float] = ..., leases_omitted: _Optional[int] = ..., queue_omitted: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("self", "role", "executors", "executors_omitted", "gangs")
    SELF_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EXECUTORS_FIELD_NUMBER: _ClassVar[int]
    EXECUTORS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    GANGS_FIELD_NUMBER: _ClassVar[int]
    self: NodeStatus
    role: str
    executors: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    executors_omitted: int
    gangs: _containers.RepeatedCompositeFieldContainer[GangStatus]
    def __init__(self_, self: _Optional[_Union[NodeStatus, _Mapping]] = ..., role: _Optional[str] = ..., executors: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., executors_omitted: _Optional[int] = ..., gangs: _Optional[_Iterable[_Union[GangStatus, _Mapping]]] = ...) -> None: ...

class ExecutorMessage(_message.Message):
    __slots__ = ("join", "state", "taken")
    JOIN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TAKEN_FIELD_NUMBER: _ClassVar[int]
    join: NodeStatus
    state: NodeStatus
    taken: PartTaken
    def __init__(self, join: _Optional[_Union[NodeStatus, _Mapping]] = ..., state: _Optional[_Union[NodeStatus, _Mapping]] = ..., taken: _Optional[_Union[PartTaken, _Mapping]] = ...) -> None: ...

class ControllerMessage(_message.Message):
    __slots__ = ("note", "take", "drop")
    NOTE_FIELD_NUMBER: _ClassVar[int]
    TAKE_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    note: str
    take: TakePart
    drop: DropPart
    def __init__(self, note: _Optional[str] = ..., take: _Optional[_Union[TakePart, _Mapping]] = ..., drop: _Optional[_Union[DropPart, _Mapping]] = ...) -> None: ...

class TakePart(_message.Message):
    __slots__ = ("part_id", "gang", "gpu_count", "job_id")
    PART_ID_FIELD_NUMBER: _ClassVar[int]
    GANG_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    part_id: str
    gang: str
    gpu_count: int
    job_id: str
    def __init__(self, part_id: _Optional[str] = ..., gang: _Optional[str] = ..., gpu_count: _Optional[int] = ..., job_id: _Optional[str] = ...) -> None: ...

class DropPart(_message.Message):
    __slots__ = ("part_id", "reason")
    PART_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    part_id: str
    reason: str
    def __init__(self, part_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PartTaken(_message.Message):
    __slots__ = ("part_id", "gpu_indices", "device_ids", "free_port", "error")
    PART_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    FREE_PORT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    part_id: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    free_port: int
    error: str
    def __init__(self, part_id: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., device_ids: _Optional[_Iterable[str]] = ..., free_port: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...
