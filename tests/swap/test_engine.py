"""The swap engine on device `cpu`: what moves, that nothing else changes, and failures."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from acb_slurm.swap import SwapEngine, SwapError, SwapState, SwapWarning

DATA = Path(__file__).parent / "data"


class TiedLM(torch.nn.Module):
    """A small language model whose output layer shares the embedding's weight."""

    def __init__(self, vocab: int = 97, width: int = 48):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.out = torch.nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.full((width,), 0.5))

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + memory[: tokens.shape[1]]
        h = self.norm(torch.relu(self.mix(h)) * self.scale + h)
        return self.out(h)


class Run:
    """A model, its Adam state and tensors the program holds in plain variables."""

    def __init__(self, seed: int = 1234):
        torch.manual_seed(seed)
        self.model = TiedLM()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.memory = torch.randn(16, 48)  # a plain variable used by every step
        self.memory_rows = self.memory[::2]  # a view of it
        self.head_view = self.model.out.weight[:10]  # a view of the tied weight
        self.tokens = torch.randint(0, 97, (4, 12))
        self.losses: list[torch.Tensor] = []

    def train(self, steps: int) -> None:
        for _ in range(steps):
            self.opt.zero_grad()
            logits = self.model(self.tokens[:, :-1], self.memory)
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), self.tokens[:, 1:].reshape(-1)
            )
            loss.backward()
            self.opt.step()
            self.memory_rows.mul_(0.99)  # writes through the view into `memory`
            self.losses.append(loss.detach().clone())

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor object of the run that lives on the device."""
        out = [*self.model.parameters(), *self.model.buffers(), self.memory, self.memory_rows]
        out += [self.head_view, self.tokens, *self.losses]
        out += [p.grad for p in self.model.parameters() if p.grad is not None]
        for state in self.opt.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return out


def distinct_bytes(tensors: list[torch.Tensor]) -> int:
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def as_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's values as plain bytes: no storage the engine could move (or corrupt)."""
    return tensor.detach().contiguous().numpy().tobytes()


def test_offloaded_training_equals_a_run_never_offloaded_bit_for_bit() -> None:
    # The engine moves every storage of the process, the reference run's too: its values are
    # kept as bytes, taken before any offload, so a corruption cannot hit both sides alike.
    reference = Run()
    reference.train(6)
    ref_losses = [as_bytes(x) for x in reference.losses]
    ref_state = {name: as_bytes(v) for name, v in reference.model.state_dict().items()}
    ref_memory = as_bytes(reference.memory)
    del reference

    run = Run()
    run.train(3)
    ids = [id(t) for t in run.tensors()]
    state_ids = {id(p): {k: id(v) for k, v in s.items()} for p, s in run.opt.state.items()}
    expected_bytes = distinct_bytes(run.tensors())
    engine = SwapEngine("cpu")

    stats = engine.offload()

    assert engine.state is SwapState.OFFLOADED
    assert all(t.untyped_storage().nbytes() == 0 for t in run.tensors())
    assert stats.bytes >= expected_bytes > 0
    assert engine.offloaded_bytes == stats.bytes
    assert engine.resident_bytes() == 0, "a storage on the device was not found by the walk"

    back = engine.onload()
    assert back.bytes == stats.bytes and back.storages == stats.storages
    assert [id(t) for t in run.tensors()] == ids
    assert {id(p): {k: id(v) for k, v in s.items()} for p, s in run.opt.state.items()} == state_ids
    assert run.model.out.weight is run.model.embed.weight
    run.train(3)

    assert len(run.losses) == len(ref_losses) == 6
    assert [as_bytes(x) for x in run.losses] == ref_losses
    state = {name: as_bytes(v) for name, v in run.model.state_dict().items()}
    assert state.keys() == ref_state.keys()
    for name, value in state.items():
        assert value == ref_state[name], name
    assert as_bytes(run.memory) == ref_memory


def test_views_and_tied_weights_move_once() -> None:
    base = torch.randn(1000)
    views = [base[10:20], base.view(10, 100), base[::3]]
    engine = SwapEngine("cpu")
    stats = engine.offload()
    try:
        keys = [e.storage._cdata for e in engine._entries]
        assert len(keys) == len(set(keys)) == stats.storages
        kept = [e for e in engine._entries if e.storage._cdata == base.untyped_storage()._cdata]
        assert len(kept) == 1 and kept[0].nbytes == 4000
        assert all(v.untyped_storage().nbytes() == 0 for v in views)
    finally:
        engine.onload()
    assert torch.equal(views[1].reshape(-1), base)


def test_unresizable_storage_is_left_in_place_with_a_warning_naming_its_bytes() -> None:
    array = np.arange(4096, dtype=np.float64)
    wrapped = torch.from_numpy(array)  # memory owned by numpy: cannot be resized
    moved = torch.randn(256)
    engine = SwapEngine("cpu")
    with pytest.warns(SwapWarning, match=r"32\.0KiB of Tensor not resizable"):
        stats = engine.offload()
    try:
        assert stats.skipped_bytes >= 4096 * 8
        assert moved.untyped_storage().nbytes() == 0
        assert wrapped.untyped_storage().nbytes() == 4096 * 8
    finally:
        engine.onload()
    assert wrapped.sum().item() == array.sum()


def test_storage_shared_with_other_processes_is_not_moved() -> None:
    shared = torch.arange(1024, dtype=torch.float32).share_memory_()
    engine = SwapEngine("cpu")
    with pytest.warns(SwapWarning, match="shared with other processes"):
        engine.offload()
    try:
        assert shared.untyped_storage().nbytes() == 4096
    finally:
        engine.onload()
    assert torch.equal(shared, torch.arange(1024, dtype=torch.float32))


def test_a_tensor_dropped_while_offloaded_is_not_brought_back() -> None:
    keep, drop = torch.randn(1000), torch.randn(3000)
    keep_copy = keep.clone()
    engine = SwapEngine("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SwapWarning)
        out = engine.offload()
    del drop
    back = engine.onload()
    assert back.storages == out.storages - 1
    assert back.bytes == out.bytes - 12000
    assert torch.equal(keep, keep_copy)


def test_calls_out_of_order_are_refused_with_a_reason() -> None:
    engine = SwapEngine("cpu")
    with pytest.raises(SwapError, match="offload\\(\\) first"):
        engine.onload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SwapWarning)
        engine.offload()
    try:
        with pytest.raises(SwapError, match="already in host memory"):
            engine.offload()
    finally:
        engine.onload()


def test_failed_offload_and_failed_onload_lose_nothing() -> None:
    """Real allocation failures (an address-space limit) in a fresh process."""
    proc = subprocess.run(
        [sys.executable, str(DATA / "swap_under_memory_limit.py")],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "before any device memory was freed" in result["offload_error"]
    assert result["state_after_failed_offload"] == "resident"
    assert result["intact_after_failed_offload"]
    assert "nothing was lost" in result["onload_error"]
    assert result["state_after_failed_onload"] == "offloaded"
    assert result["empty_after_failed_onload"]
    assert result["resident_at_end"] and result["intact_at_end"]


def test_a_storage_aliased_by_one_that_cannot_move_stays_too() -> None:
    """torch.from_dlpack(t) makes a second, non-resizable storage over t's memory: moving t's
    storage would leave the alias pointing at freed memory."""
    original = torch.arange(2048, dtype=torch.float32)
    alias = torch.from_dlpack(original)
    engine = SwapEngine("cpu")
    with pytest.warns(SwapWarning, match="sharing memory with a storage that cannot move"):
        engine.offload()
    try:
        assert original.untyped_storage().nbytes() == 8192
    finally:
        engine.onload()
    alias.add_(1)
    assert torch.equal(original, torch.arange(2048, dtype=torch.float32) + 1)


# ---- everything a program can hold -------------------------------------------------------------


def _offloaded(*tensors: torch.Tensor) -> bool:
    return all(t.untyped_storage().nbytes() == 0 for t in tensors)


def test_wrapper_subclasses_move_their_inner_tensors_never_their_placeholder() -> None:
    """Nested jagged tensors and TwoTensor (DTensor, FSDP2 and torchao work alike) keep their
    data in inner tensors; their own storage has no memory behind it and must not be copied."""
    from torch.testing._internal.two_tensor import TwoTensor

    torch.manual_seed(0)
    two = TwoTensor(torch.randn(64), torch.randn(64))
    jagged = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)], layout=torch.jagged)
    expected_two, expected_jagged = (two.a + two.b).clone(), jagged.values().clone()
    engine = SwapEngine("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SwapWarning)  # nothing is left behind
        engine.offload()
    assert _offloaded(two.a, two.b, jagged.values())
    engine.onload()
    assert torch.equal(two.a + two.b, expected_two)
    assert torch.equal(jagged.sin().values(), expected_jagged.sin())


def test_a_wrapper_subclass_next_to_an_unresizable_tensor_does_not_break_the_walk() -> None:
    from torch.testing._internal.two_tensor import TwoTensor

    two = TwoTensor(torch.ones(32), torch.full((32,), 2.0))
    pinned = torch.from_numpy(np.arange(512, dtype=np.float32))
    engine = SwapEngine("cpu")
    with pytest.warns(SwapWarning, match=r"2\.0KiB of Tensor not resizable"):
        engine.offload()
    assert _offloaded(two.a, two.b) and pinned.untyped_storage().nbytes() == 2048
    engine.onload()
    assert (two.a + two.b).sum().item() == 96.0 and pinned.sum().item() == sum(range(512))


def test_sparse_compressed_layouts_move_every_component() -> None:
    torch.manual_seed(0)
    dense = torch.randn(16, 16).relu()
    csr, csc = dense.to_sparse_csr(), dense.to_sparse_csc()
    bsr = dense.to_sparse_bsr((4, 4))
    del dense
    expected = [t.to_dense().clone() for t in (csr, csc, bsr)]
    engine = SwapEngine("cpu")
    engine.offload()
    assert _offloaded(csr.values(), csr.crow_indices(), csr.col_indices())
    assert _offloaded(csc.values(), csc.ccol_indices(), bsr.values())
    engine.onload()
    for got, want in zip((csr, csc, bsr), expected, strict=True):
        assert torch.equal(got.to_dense(), want)


def test_a_per_channel_quantizer_s_scales_move_with_its_tensor() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized dtypes are deprecated
        q = torch.quantize_per_channel(
            torch.randn(4, 8), torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.zeros(4, dtype=torch.long),
            0, torch.qint8,
        )  # fmt: skip
    expected = q.dequantize().clone()
    engine = SwapEngine("cpu")
    engine.offload()
    assert _offloaded(q.q_per_channel_scales(), q.q_per_channel_zero_points())
    engine.onload()
    assert torch.equal(q.dequantize(), expected)


def test_tensors_saved_for_backward_move_and_backward_is_unchanged() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 32, requires_grad=True)
    x = torch.randn(8, 32)
    loss = torch.tanh(x @ w).exp().sum()  # tanh's and exp's results live only in the graph
    saved = loss.grad_fn.next_functions[0][0]._saved_result  # exp's result
    reference = torch.autograd.grad(torch.tanh(x @ w).exp().sum(), w)[0]
    engine = SwapEngine("cpu")
    engine.offload()
    assert _offloaded(saved)
    engine.onload()
    loss.backward()
    assert torch.equal(w.grad, reference)


def test_scripted_modules_bare_storages_are_moved() -> None:
    torch.manual_seed(0)
    scripted = torch.jit.script(torch.nn.Linear(8, 4))
    storage = torch.UntypedStorage(256)
    torch.empty(0, dtype=torch.uint8).set_(storage).copy_(torch.arange(256, dtype=torch.uint8))
    x = torch.randn(2, 8)
    expected = scripted(x).clone()
    del x
    engine = SwapEngine("cpu")
    engine.offload()
    assert storage.nbytes() == 0
    assert _offloaded(*scripted.parameters())
    engine.onload()
    assert scripted(torch.randn(2, 8).copy_(torch.zeros(2, 8))).shape == (2, 4)
    assert torch.equal(bytes_of(storage), torch.arange(256, dtype=torch.uint8))
    assert expected.shape == (2, 4)


def bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage).clone()


def test_what_stays_is_said_once_with_its_type_and_size() -> None:
    pinned = torch.from_numpy(np.zeros(1024, dtype=np.float32))
    engine = SwapEngine("cpu")
    with pytest.warns(SwapWarning, match=r"4\.0KiB of Tensor not resizable"):
        engine.offload()
    engine.onload()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SwapWarning)  # the second time: silent
        engine.offload()
    engine.onload()
    assert pinned.untyped_storage().nbytes() == 4096


def test_any_failure_inside_the_walk_is_a_swap_error_and_moves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from acb_slurm.swap import engine as engine_module

    x = torch.randn(100)

    def broken(tensor: torch.Tensor) -> list[torch.Tensor]:
        raise KeyError("a bug the engine did not foresee")

    monkeypatch.setattr(engine_module, "_saved_by_autograd", broken)
    engine = SwapEngine("cpu")
    with pytest.raises(SwapError, match=r"KeyError.*intact"):
        engine.offload()
    assert engine.state is SwapState.RESIDENT and x.untyped_storage().nbytes() == 400
