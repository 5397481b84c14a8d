"""The per-job GPU assigner daemon (`acb-assigner`) of one node.

`inventory` (NVML or virtual GPUs) → `leases.LeaseBook` (sessions, leases, counters; drives the
scheduler core; refuses, grants and reports in its own terms, without gRPC) → `server` (thin
grpc.aio servicers that map the book's errors and results to gRPC codes and messages, token check,
health) → `cli`. `eventlog` writes the JSON-lines log, `executor` reports to a multi-node job's
controller, and `testing` starts a real daemon process for tests and benchmarks.
"""
