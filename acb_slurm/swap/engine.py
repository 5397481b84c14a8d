"""Storage-level swap: move every tensor storage of this process off a device and back.

`SwapEngine.offload()` finds every live storage on the managed device, copies it into one host
buffer and frees the device memory with ``untyped_storage().resize_(0)``; `onload()` resizes the
storages back and copies the bytes in. The Python tensor objects are never touched: parameters,
gradients, optimizer state, views and tied weights keep their identity, so the program continues
as if nothing happened.

Approaches considered, and why this one:

- Moving modules with ``module.to("cpu")``: replaces ``param.data`` but misses tensors held in
  plain variables, optimizer state and anything outside a module, and breaks views.
- A pluggable CUDA allocator backed by CUDA virtual memory (vLLM's sleep mode,
  ``vllm/device_allocator/cumem.py``): unmaps physical pages while keeping virtual addresses, so
  even captured CUDA graphs survive. It needs a C extension calling the driver API (vLLM records
  that ctypes and cuda-python bindings failed on context mismatch) and must own every allocation
  from process start; it cannot run on ``cpu``, so CI could not prove it.
- Storage resize (this module): works with the stock allocators of every device type, so the
  SAME code runs on ``cpu`` in CI and on CUDA in production. Its limits are the objects it cannot
  see or resize, and each of them is reported (`SwapWarning`) with the bytes left behind:
  storages that are not resizable (``from_numpy``, ``from_blob``, DLPack) and the storages whose
  memory they alias, storages shared with other processes, storages inside CUDA graph pools, and
  device memory torch keeps that no Python tensor reaches
  (autograd saved tensors, C++ buffers: ``torch.cuda.memory_reserved`` after the swap). Memory
  handed to other libraries without a torch tensor (a CuPy array made with DLPack, a numpy view
  of a ``cpu`` tensor) cannot be seen: it must not be used across a swap.

Finding storages: a walk of ``gc.get_objects()`` for tensors (Parameters, ``.grad``, optimizer
state, locals and globals alike: all are gc-tracked Python objects), bare ``UntypedStorage``
objects and scripted modules, plus the tensors autograd saved in the graphs those tensors belong
to; deduplicated by the storage implementation (``untyped_storage()._cdata``), so a storage shared
by views or tied weights moves once. Wrapper subclasses (``__tensor_flatten__``) contribute their
inner tensors, sparse layouts their components; a wrapper's own placeholder storage (no memory
behind it) is never copied. The walk is needed at every offload: tensors are made by C++ (autograd,
``__torch_dispatch__`` subclasses, other threads, calls with torch functions disabled) without
passing any Python hook, so only the heap shows them all; it costs ~35 ms with torch's ~290k
objects (one filtered pass in C), and only the young generations are collected first (a full
collection cost ~115 ms). While away, the engine holds each storage; one that nothing else holds
any more (the program dropped its tensors meanwhile) is not brought back.

Copies: on CUDA, one page-locked host buffer (``cudaHostRegister`` of a plain allocation, kept
between swaps so the pinning cost is paid once), every copy queued ``non_blocking`` on the current
stream and one synchronisation per device. On ``cpu`` the host buffer is a separate allocation (a
uint8 tensor), so ``resize_(0)`` really frees the storage's own memory; it is kept between swaps
as on CUDA (``keep_host_buffer``), since a fresh buffer pays a page fault per 4 KiB on every
offload (benchmarks/swap_bandwidth_bench.py).

CUDA graphs: a captured graph replays fixed device addresses, its inputs included, and those
live outside its private pool where the engine cannot tell them from any other storage. Moving
them would make the next replay read freed memory. So while any private pool exists (a
``torch.cuda.CUDAGraph``, ``torch.compile(mode="reduce-overhead")``, a ``MemPool``), offload
refuses with `SwapError` and leaves everything where it was. With ``allow_graph_pools=True`` (the
program re-captures its graphs after every swap) the storages outside the pools move, those
inside stay and are reported, and a graph captured before the swap must not be replayed again.

Failure is never half-done: offload frees no storage before every host copy is complete; a failed
onload gives back what it re-allocated, keeps the host copies and re-raises, so a retry works.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import logging
import sys
import threading
import time
import warnings
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate, compress

import torch

from acb_slurm.units import format_size

log = logging.getLogger(__name__)

#: Host-buffer slices start on this boundary (DMA-friendly, and cheap).
_ALIGN = 512


class SwapError(RuntimeError):
    """A swap could not be done; the data is where it was before the call."""


class SwapWarning(UserWarning):
    """A swap was not complete: some device bytes could not be moved (the message says which)."""


class SwapState(enum.StrEnum):
    """Where the managed storages are: RESIDENT (on the device) ⇄ OFFLOADED (in host memory)."""

    RESIDENT = "resident"
    OFFLOADED = "offloaded"


@dataclass(frozen=True)
class SwapStats:
    """What one offload or onload did."""

    direction: str  # "offload" or "onload"
    storages: int
    bytes: int
    seconds: float
    skipped_bytes: int = 0  # device bytes left where they were (reported in a SwapWarning)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (
            f"{self.direction}: {self.storages} storages, {format_size(self.bytes)} in "
            f"{self.seconds * 1e3:.1f} ms ({self.gb_per_s:.2f} GB/s)"
        )


@dataclass
class _Entry:
    """One device storage that is (or is about to be) away, and where its bytes are."""

    storage: torch.UntypedStorage
    nbytes: int
    device: torch.device
    offset: int  # into the host buffer


@dataclass
class _Skipped:
    """Device bytes left in place for one reason, and the types of the objects holding them."""

    nbytes: int = 0
    kinds: set[str] = field(default_factory=set)


@dataclass
class _Found:
    """The result of a walk: storages to move, and what cannot be moved and why."""

    storages: list[torch.UntypedStorage] = field(default_factory=list)
    skipped: dict[str, _Skipped] = field(default_factory=dict)  # reason -> what stays

    def skip(self, reason: str, nbytes: int, kind: str = "") -> None:
        entry = self.skipped.setdefault(reason, _Skipped())
        entry.nbytes += nbytes
        if kind:
            entry.kinds.add(kind)

    @property
    def skipped_bytes(self) -> int:
        return sum(e.nbytes for e in self.skipped.values())


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over all of `storage` (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


#: Scripted modules keep their parameters in C++; the Python object lists them.
_STORAGES: frozenset[type] = frozenset([torch.UntypedStorage])
_SCRIPTED: frozenset[type] = frozenset(
    [torch.jit.RecursiveScriptModule, torch.jit.ScriptModule]  # type: ignore[attr-defined]
)


def _tensor_types() -> set[type]:
    """torch.Tensor and every subclass defined so far (Parameter, Buffer, user subclasses)."""
    kinds: set[type] = set()
    todo: list[type] = [torch.Tensor]
    while todo:
        cls = todo.pop()
        if cls not in kinds:
            kinds.add(cls)
            todo.extend(cls.__subclasses__())
    return kinds


def _orphaned(entry: _Entry) -> bool:
    """True when only the engine still holds the entry's storage: no tensor uses it (C++ use
    count) and no other Python reference holds the storage object (a bare ``UntypedStorage``
    the program keeps has a use count of one, like a storage nobody holds)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None or use_count(entry.storage._cdata) > 1:
        return False
    # References here: the entry's field and getrefcount's argument.
    return sys.getrefcount(entry.storage) <= 2


#: Layouts whose memory lives in component tensors: (accessor names) per layout.
_COMPONENTS: dict[torch.layout, tuple[str, ...]] = {
    torch.sparse_coo: ("_values", "_indices"),
    torch.sparse_csr: ("values", "crow_indices", "col_indices"),
    torch.sparse_bsr: ("values", "crow_indices", "col_indices"),
    torch.sparse_csc: ("values", "ccol_indices", "row_indices"),
    torch.sparse_bsc: ("values", "ccol_indices", "row_indices"),
}
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_affine_float_qparams)


def _inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor] | None:
    """The tensors a wrapper subclass (``__tensor_flatten__``: nested jagged tensors, DTensor,
    TwoTensor, FSDP2's and torchao's tensors) keeps its data in; None for any other tensor.
    A wrapper's own storage is a placeholder with no memory behind it: never copy it."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None:
        return None
    names, _ = flatten(tensor)
    inner = (getattr(tensor, name, None) for name in names)
    return [t for t in inner if isinstance(t, torch.Tensor)]


def _storages_of(tensor: torch.Tensor, depth: int = 8) -> Iterator[torch.UntypedStorage]:
    """The storages behind one tensor object: the components of sparse layouts, the inner
    tensors of wrapper subclasses, a per-channel quantizer's scales; none for meta/fake."""
    inner = _inner_tensors(tensor)
    if inner is not None:
        if depth > 0:
            for t in inner:
                yield from _storages_of(t, depth - 1)
        return
    accessors = _COMPONENTS.get(tensor.layout)
    if accessors is not None:
        for name in accessors:
            yield from _storages_of(getattr(tensor, name)(), depth - 1)
        return
    if tensor.is_quantized and tensor.qscheme() in _PER_CHANNEL:
        yield tensor.q_per_channel_scales().untyped_storage()
        yield tensor.q_per_channel_zero_points().untyped_storage()
    yield tensor.untyped_storage()


def _saved_by_autograd(roots: Iterable[torch.Tensor], budget: int = 100_000) -> list[torch.Tensor]:
    """Tensors the autograd graphs reachable from `roots` saved for backward (C++ objects that no
    Python reference reaches): read through each node's ``_saved_*`` attributes and, for custom
    Functions, ``saved_tensors``. A node whose tensors were freed (after backward) or changed
    in place raises on access and is skipped: such tensors are not used again."""
    out: list[torch.Tensor] = []
    names_of: dict[type, list[str]] = {}
    seen: set[int] = set()
    todo = [t.grad_fn for t in roots if t.grad_fn is not None]
    while todo and budget > 0:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        budget -= 1
        kind = type(node)
        names = names_of.get(kind)
        if names is None:
            names = names_of[kind] = [n for n in dir(node) if n.startswith("_saved_")]
            if hasattr(node, "saved_tensors"):
                names.append("saved_tensors")
        for name in names:
            try:
                value = getattr(node, name)
            except RuntimeError:
                continue
            if isinstance(value, torch.Tensor):
                out.append(value)
            elif isinstance(value, (tuple, list)):
                out.extend(v for v in value if isinstance(v, torch.Tensor))
        todo.extend(fn for fn, _ in node.next_functions if fn is not None)
    return out


class SwapEngine:
    """Offload/onload every tensor storage of this process on one device type (or index).

    `device` is ``"cuda"`` (all CUDA devices of the process), ``"cuda:1"`` or ``"cpu"`` (the
    testable stand-in). Thread-safe: offload and onload are serialised by an internal lock; the
    caller (automatic mode) is responsible for no tensor op running concurrently with them.
    """

    def __init__(
        self,
        device: str | torch.device = "cuda",
        *,
        keep_host_buffer: bool = True,
        allow_graph_pools: bool = False,
    ):
        self.device = torch.device(device)
        self.allow_graph_pools = allow_graph_pools
        self._keep_host_buffer = keep_host_buffer
        self._entries: list[_Entry] = []
        self._host: torch.Tensor | None = None  # holds the bytes of the offloaded storages
        self._host_registered = False  # page-locked with cudaHostRegister (to unregister)
        self._state = SwapState.RESIDENT
        self._lock = threading.Lock()
        self._own: set[int] = set()  # ids of tensors the engine made (never swapped)
        self._warned: set[tuple[str, frozenset[str]]] = set()  # what SwapWarning has named
        self.last: SwapStats | None = None

    # ---- public API -------------------------------------------------------------------------

    @property
    def state(self) -> SwapState:
        return self._state

    @property
    def offloaded_bytes(self) -> int:
        """Bytes held in host memory for the device while offloaded (0 while resident)."""
        return sum(e.nbytes for e in self._entries)

    def resident_bytes(self) -> int:
        """Bytes of live storages on the managed device now (a gc walk; not for hot paths)."""
        return sum(s.nbytes() for s in self._find().storages)

    def offload(self) -> SwapStats:
        """Copy every device storage to host memory, then free it on the device.

        Any failure raises SwapError with the data where it was (nothing freed, or every freed
        storage restored). Warns `SwapWarning`, once per kind of object, naming what stays on
        the device and how many bytes.
        """
        with self._lock:
            if self._state is SwapState.OFFLOADED:
                raise SwapError("offload() called twice: the storages are already in host memory")
            start = time.perf_counter()
            total = 0
            try:
                self._synchronize(self._devices_in_use())
                # The young generations only (a few ms, not the ~100 ms of a full collection):
                # fresh garbage holding device storages is freed rather than copied; older
                # garbage is copied and not brought back (see onload: `_orphaned`).
                gc.collect(1)
                found = self._find()
                self._synchronize({s.device for s in found.storages})
                entries, total = self._plan(found.storages)
                if entries:  # nothing to move: no host buffer (no pinning) either
                    self._copy_out(entries, self._host_buffer(total))
            except Exception as exc:
                self._drop_host_buffer()
                raise SwapError(
                    f"offload failed before any device memory was freed ({type(exc).__name__}: "
                    f"{exc}); the program's tensors are intact"
                    + (f" (host memory needed: {format_size(total)})" if total else "")
                ) from exc
            self._free_device(entries)
            self._entries, self._state = entries, SwapState.OFFLOADED
            try:
                if self.device.type == "cuda":
                    self._return_to_driver()
                    self._check_reserved(found)
                self._warn_skipped(found)
            except SwapWarning:
                raise  # warnings turned into errors by the caller's filter
            except Exception as exc:  # the move is complete; reporting must not undo it
                log.warning("offload: reporting what stayed on %s failed: %s", self.device, exc)
            moved = sum(e.nbytes for e in entries)
            self.last = SwapStats(
                "offload", len(entries), moved, time.perf_counter() - start, found.skipped_bytes
            )
            log.debug("%s", self.last)
            return self.last

    def onload(self) -> SwapStats:
        """Re-allocate every offloaded storage on the device and copy its bytes back.

        On failure (device out of memory, ...) everything re-allocated is freed again, the host
        copies are kept, and SwapError is raised: call onload() again once memory is available.
        """
        with self._lock:
            if self._state is SwapState.RESIDENT:
                raise SwapError("onload() called while resident: offload() first")
            start = time.perf_counter()
            assert self._host is not None or not self._entries
            live = [(e, e.storage) for e in self._entries if not _orphaned(e)]
            grown: list[torch.UntypedStorage] = []
            try:
                # Every allocation first, then every copy: cudaMalloc (which may synchronise the
                # device) never runs between two queued copies.
                for entry, storage in live:
                    storage.resize_(entry.nbytes)
                    grown.append(storage)
                with self._copying():
                    for entry, storage in live:
                        assert self._host is not None
                        _byte_view(storage).copy_(
                            self._host[entry.offset : entry.offset + entry.nbytes],
                            non_blocking=True,
                        )
                self._synchronize({e.device for e, _ in live})
            except Exception as exc:
                for storage in grown:
                    storage.resize_(0)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                raise SwapError(
                    f"onload failed after {len(grown)} of {len(live)} storages ({exc}); their "
                    "bytes are still in host memory and nothing was lost: free device memory and "
                    "call onload() again"
                ) from exc
            moved = sum(e.nbytes for e, _ in live)
            self._entries, self._state = [], SwapState.RESIDENT
            if not self._keep_host_buffer:
                self._drop_host_buffer()
            self.last = SwapStats("onload", len(live), moved, time.perf_counter() - start)
            log.debug("%s", self.last)
            return self.last

    def close(self) -> None:
        """Give back the host buffer (after onload; a no-op while offloaded)."""
        with self._lock:
            if self._state is SwapState.RESIDENT:
                self._drop_host_buffer()

    # ---- finding storages -------------------------------------------------------------------

    def _matches(self, device: torch.device) -> bool:
        if device.type != self.device.type:
            return False
        return self.device.index is None or device.index == self.device.index

    def _find(self) -> _Found:
        """Every distinct, non-empty storage on the managed device that the program can reach:
        from any tensor object on the heap (Parameters, ``.grad``, optimizer state, locals,
        wrapper subclasses' inner tensors, sparse components, quantizer scales), from bare
        ``UntypedStorage`` objects, from scripted modules' parameters and buffers, and from what
        autograd saved for backward in the graphs those tensors belong to."""
        found = _Found()
        seen: set[int] = set()
        fixed: list[tuple[int, int]] = []  # memory of storages that stay: [start, end)
        own = self._own
        # Filtering by exact type in C (compress/map) keeps the walk at a few ns per object.
        kinds = _tensor_types()
        wanted = kinds | _STORAGES | _SCRIPTED
        objects = gc.get_objects()
        hits = list(compress(objects, map(wanted.__contains__, map(type, objects))))
        del objects
        tensors = [o for o in hits if type(o) in kinds]
        bare = [o for o in hits if type(o) in _STORAGES]
        scripted = [o for o in hits if type(o) in _SCRIPTED and hasattr(o, "_c")]
        del hits
        graphs = [t for t in tensors if t.grad_fn is not None]

        def visit(storage: torch.UntypedStorage, kind: str) -> None:
            key = storage._cdata
            if key in seen:
                return
            seen.add(key)
            if not self._matches(storage.device):
                return
            nbytes = storage.nbytes()
            if nbytes == 0:
                return
            try:
                ptr = storage.data_ptr()
            except RuntimeError:  # a wrapper subclass's placeholder: no memory behind it
                return
            reason = self._unmovable(storage)
            if reason:
                found.skip(reason, nbytes, kind)
                fixed.append((ptr, ptr + nbytes))
            else:
                found.storages.append(storage)

        def visit_tensor(tensor: torch.Tensor, kind: str) -> None:
            try:
                storages = list(_storages_of(tensor))
            except (RuntimeError, NotImplementedError, TypeError, AttributeError):
                # No storage torch can reach (opaque layouts such as mkldnn, functional or
                # fake wrappers): it stays where it is, and is reported if it holds memory.
                if self._matches(tensor.device) and tensor.layout is not torch.strided:
                    found.skip(
                        f"opaque layout {tensor.layout} (no storage to move)",
                        tensor.numel() * tensor.element_size(),
                        kind,
                    )
                return
            for storage in storages:
                visit(storage, kind)

        for obj in tensors:
            if id(obj) not in own:
                visit_tensor(obj, type(obj).__name__)
        for storage in bare:
            visit(storage, "UntypedStorage")
        for module in scripted:
            for tensor in (*module.parameters(), *module.buffers()):
                visit_tensor(tensor, f"{type(module).__name__} parameter")
        for tensor in _saved_by_autograd(graphs):
            visit_tensor(tensor, "tensor saved by autograd")
        if fixed:
            self._skip_aliases(found, fixed)
        if self.device.type == "cuda" and found.storages:
            self._skip_graph_pools(found, refuse=not self.allow_graph_pools)
        return found

    @staticmethod
    def _unmovable(storage: torch.UntypedStorage) -> str | None:
        if not storage.resizable():
            return "not resizable (from_numpy, from_blob or DLPack memory)"
        if storage.device.type == "cpu" and storage.is_shared():
            return "shared with other processes (share_memory_)"
        return None

    @staticmethod
    def _skip_aliases(found: _Found, fixed: list[tuple[int, int]]) -> None:
        """Leave storages whose memory a storage that stays also covers (``from_dlpack(t)``
        while ``t`` lives): moving one would leave the other pointing at freed memory."""
        fixed.sort()
        starts = [lo for lo, _ in fixed]
        ends = list(accumulate((hi for _, hi in fixed), max))  # furthest end up to each start
        keep = []
        for storage in found.storages:
            lo = storage.data_ptr()
            hi = lo + storage.nbytes()
            i = bisect_left(starts, hi) - 1  # last fixed range starting before `hi`
            if i >= 0 and ends[i] > lo:
                found.skip(
                    "sharing memory with a storage that cannot move", storage.nbytes(), "Tensor"
                )
            else:
                keep.append(storage)
        found.storages = keep

    @staticmethod
    def _skip_graph_pools(found: _Found, *, refuse: bool) -> None:
        """Leave storages inside private pools (CUDA graphs, MemPools); with `refuse`, raise
        SwapError when any private pool exists (a graph's inputs outside it would move)."""
        ranges = [
            (seg["address"], seg["address"] + seg["total_size"])
            for seg in torch.cuda.memory_snapshot()
            if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0)
        ]
        if not ranges:
            return
        if refuse:
            pooled = sum(hi - lo for lo, hi in ranges)
            raise SwapError(
                f"this process has CUDA graph or private memory pools ({format_size(pooled)} in "
                f"{len(ranges)} segments): a captured graph replays fixed addresses, so moving "
                "its inputs would corrupt the next replay. Nothing was moved. Opt in with "
                "allow_graph_pools=True (acb-run --auto: ACB_SWAP_ALLOW_GRAPHS=1) only if the "
                "program re-captures its graphs after every swap."
            )
        keep = []
        for storage in found.storages:
            ptr = storage.data_ptr()
            if any(lo <= ptr < hi for lo, hi in ranges):
                found.skip(
                    "in a CUDA graph or private memory pool (do not replay a graph captured "
                    "before a swap: its inputs moved)",
                    storage.nbytes(),
                    "Tensor",
                )
            else:
                keep.append(storage)
        found.storages = keep

    # ---- copies -----------------------------------------------------------------------------

    def _plan(self, storages: Iterable[torch.UntypedStorage]) -> tuple[list[_Entry], int]:
        entries, offset = [], 0
        for storage in storages:
            nbytes = storage.nbytes()
            entries.append(_Entry(storage, nbytes, storage.device, offset))
            offset = _align(offset + nbytes)
        return entries, offset

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        """A host uint8 buffer of at least `nbytes`: page-locked when the device is CUDA."""
        if self._host is not None and self._host.numel() >= nbytes:
            return self._host
        self._drop_host_buffer()
        host = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        self._own.add(id(host))
        self._host = host
        if self.device.type == "cuda":
            self._host_registered = self._pin(host)
            if not self._host_registered:  # fall back on torch's caching host allocator
                self._own.discard(id(host))
                host = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
                self._own.add(id(host))
                self._host = host
        return host

    @staticmethod
    def _pin(host: torch.Tensor) -> bool:
        """Page-lock `host` in place (no power-of-two rounding, unlike pin_memory=True)."""
        try:
            rc = int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel(), 0))
        except Exception:  # cudart not exposed by this build
            return False
        return rc == 0

    def _drop_host_buffer(self) -> None:
        if self._host is None:
            return
        if self._host_registered:
            torch.cuda.cudart().cudaHostUnregister(self._host.data_ptr())
            self._host_registered = False
        self._own.discard(id(self._host))
        self._host = None

    def _copy_out(self, entries: list[_Entry], host: torch.Tensor) -> None:
        with self._copying():
            for entry in entries:
                storage = entry.storage
                host[entry.offset : entry.offset + entry.nbytes].copy_(
                    _byte_view(storage), non_blocking=True
                )
        self._synchronize({e.device for e in entries})

    @contextlib.contextmanager
    def _copying(self) -> Iterator[None]:
        """Host-to-host copies (device ``cpu``) run on one thread: hundreds of copies each
        opening a parallel region pay a barrier each, which on a loaded machine made them run at
        a third of one large copy's speed (benchmarks/swap_bandwidth_bench.py); one thread per
        copy is memory-bound all the same. CUDA copies are DMA: nothing to change. No device
        call runs meanwhile (the caller's gate), so the setting is seen by nothing else."""
        if self.device.type != "cpu":
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _free_device(self, entries: list[_Entry]) -> None:
        """resize_(0) every storage; if one refuses, bring the freed ones back and raise."""
        freed: list[_Entry] = []
        try:
            for entry in entries:
                entry.storage.resize_(0)
                freed.append(entry)
        except Exception as exc:
            assert self._host is not None
            for entry in freed:
                entry.storage.resize_(entry.nbytes)
                _byte_view(entry.storage).copy_(
                    self._host[entry.offset : entry.offset + entry.nbytes]
                )
            self._drop_host_buffer()
            raise SwapError(
                f"offload failed while freeing device storages ({exc}); rolled back"
            ) from exc

    @staticmethod
    def _return_to_driver() -> None:
        """Give cached device memory back: cuBLAS workspaces (re-created on next use), then
        every unused block of the caching allocator."""
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        torch.cuda.empty_cache()

    def _devices_in_use(self) -> set[torch.device]:
        """CUDA devices of the managed set that already have a context. Never creates one:
        synchronising (or querying) a device without a context would make a new context there
        (hundreds of MiB on a GPU that another process may have been granted)."""
        if self.device.type != "cuda" or not torch.cuda.is_initialized():
            return set()
        indices = (
            [self.device.index]
            if self.device.index is not None
            else range(torch.cuda.device_count())
        )
        has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)
        if has_context is None:  # a build without it: only the current device is known to be up
            current = torch.cuda.current_device()
            return {torch.device("cuda", i) for i in indices if i == current}
        return {torch.device("cuda", i) for i in indices if has_context(i)}

    @staticmethod
    def _synchronize(devices: Iterable[torch.device]) -> None:
        for device in devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    # ---- reporting what could not move --------------------------------------------------

    def _check_reserved(self, found: _Found) -> None:
        """Device memory torch still reserves after the swap: storages no Python tensor reaches."""
        reserved = sum(
            torch.cuda.memory_reserved(d) for d in self._devices_in_use() if self._matches(d)
        )
        unexplained = reserved - found.skipped_bytes
        if unexplained > 0:
            found.skip(
                "held by torch but reachable from no Python tensor (autograd saved tensors, "
                "C++ buffers, allocator fragmentation)",
                unexplained,
            )

    def _warn_skipped(self, found: _Found) -> None:
        """One `SwapWarning` for what stays on the device, the first time each reason is met
        with those kinds of objects (a program that keeps one such tensor is told once)."""
        new = {
            why: e
            for why, e in found.skipped.items()
            if (why, frozenset(e.kinds)) not in self._warned
        }
        if not new:
            return
        self._warned.update((why, frozenset(e.kinds)) for why, e in new.items())
        parts = "; ".join(
            f"{format_size(e.nbytes)} of {', '.join(sorted(e.kinds)) or 'storages'} {why}"
            for why, e in new.items()
        )
        warnings.warn(
            f"offload left {format_size(found.skipped_bytes)} on {self.device}: {parts}",
            SwapWarning,
            stacklevel=3,
        )
