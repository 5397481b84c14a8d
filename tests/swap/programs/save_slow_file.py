"""`torch.save` of a whole module (with a tensor in a plain attribute) into a file object whose
large writes are slow, as when writing a checkpoint to a network file system; then loaded back."""

import hashlib
import io
import time

import torch

torch.manual_seed(0)
torch.set_num_threads(1)


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.t = torch.randn(64, 64)  # a plain attribute, not a parameter or buffer
        self.w = torch.nn.Parameter(torch.randn(64, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.t


class SlowFile(io.BytesIO):
    def write(self, data) -> int:  # type: ignore[no-untyped-def, override]
        if len(data) >= 1024:  # the tensors' bytes: a CPU phase longer than the idle interval
            time.sleep(0.3)
        return super().write(data)


model = Model()
f = SlowFile()
torch.save(model, f)
data = f.getvalue()
time.sleep(0.5)  # CPU phase after saving, every tensor alive
print("sha256", hashlib.sha256(data).hexdigest())
loaded = torch.load(io.BytesIO(data), weights_only=False)
print("t", repr(loaded.t.sum().item()), torch.equal(loaded.t, model.t))
print("w", repr(loaded.w.sum().item()), torch.equal(loaded.w, model.w))
print("out", repr(loaded(torch.ones(1, 64)).sum().item()))
