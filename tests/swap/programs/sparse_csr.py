"""Sparse CSR and CSC matrices (graph adjacency, pruned weights) kept across a CPU phase, then
multiplied by a dense vector."""

import time

import torch

torch.manual_seed(0)
torch.set_num_threads(1)

dense = torch.randn(64, 64)
dense[dense.abs() < 1.0] = 0
csr = dense.to_sparse_csr()
csc = dense.to_sparse_csc()
v = torch.randn(64)
time.sleep(0.5)  # CPU phase
print("nnz", csr._nnz(), csc._nnz())
print("csr @ v", repr((csr @ v).sum().item()))
print("csc dense", repr(csc.to_dense().sum().item()))
print("equal", torch.equal(csr.to_dense(), dense), torch.equal(csc.to_dense(), dense))
