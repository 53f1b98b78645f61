"""Computational-storage (CSD) workers: attention computed next to the KV bytes.

A worker is a separate process that owns one shard directory (`shard.CsdShard`), serves
the `tierd.v1.CsdWorker` service (`worker`), and computes partial decode attention over
its blocks (`attend`), so only a query goes in and one (out, lse) pair comes back. The
daemon reaches its workers through `pool.CsdPool`, which also starts and supervises the
local ones.

Nothing is imported here: the worker process must not pay for torch before it serves.
"""
