"""Inference on 1..N devices: batched forward passes (prefill/scoring) and greedy generation
with a KV cache, served by one of four strategies:

* ``single``: one device, the reference every other strategy is checked against;
* ``replicas``: every device holds the whole model and serves its share of the request batch;
* ``pipeline``: consecutive layers on consecutive devices, micro-batched so stages overlap
  (one micro-batch = the naive layer split);
* ``tp``: weights and the KV cache split by attention heads (the family's tensor-parallel plan).

Modules: settings (validation, config ids), engine (building and running a strategy),
generate (KV-cache decoding, local and pipelined), measure (timing, memory, batch-fit search),
verify (reference outputs), rows (result rows), worker (the torchrun entry), commands (what
the CLI and the sweep call).
"""
