"""Speed without a second program (the LeanRL recipe): wrap the SAME eager update function, never rewrite it.

    update = speed_up(update, compile=True, cudagraphs=True)    # returns a callable with the same signature

- `torch.compile` fuses the update's many small kernels (forward and backward; the optimiser step too).
- `CudaGraphUpdate` records the whole update (forward, backward, optimiser steps, multiplier updates) once as a CUDA
  graph and then replays it: one launch instead of thousands. This needs an update without host/device syncs
  (no `.item()`, `bool(tensor)`, `.cpu()`), without host-side randomness (draw on the device: torch's CUDA generator
  is graph-safe, each replay draws new numbers), with optimisers built `capturable=True`, and with every state the
  update changes (multipliers, counters) updated IN PLACE in tensors that live on the device.

The update takes a dict of tensors (a replay batch) and returns a dict of tensors (losses, statistics). Under a CUDA
graph the returned tensors are the graph's static outputs: read them (or clone them) before the next call.
"""

from __future__ import annotations

from typing import Callable

import torch

Batch = dict[str, torch.Tensor]


class CudaGraphUpdate:
    """Capture `update(batch) -> dict of tensors` as one CUDA graph after `warmup` eager calls, then replay it.

    Each call copies the batch into the graph's static input tensors (device to device, asynchronous) and replays.
    If capturing fails (an op that cannot be captured, e.g. a host sync), the update runs without a graph from then
    on and the reason is printed once: slower, never wrong.
    """

    def __init__(self, update: Callable[[Batch], Batch], warmup: int = 3, name: str = "update"):
        self.update, self.warmup, self.name = update, warmup, name
        self.calls, self.graph, self.failed = 0, None, False
        self.static_in: Batch = {}
        self.static_out: Batch = {}

    def __call__(self, batch: Batch) -> Batch:
        if self.failed:
            return self.update(batch)
        if self.graph is None and self.calls < self.warmup:
            # warm-up on a side stream, as PyTorch's whole-network capture recipe asks (allocates optimiser states,
            # lets cuDNN and torch.compile settle)
            self.calls += 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self.update(batch)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if self.graph is None:
            try:
                self.static_in = {k: v.clone() for k, v in batch.items()}
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.static_out = self.update(self.static_in)
                self.graph = graph
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to the eager update
                self.failed = True
                print(f"CUDA-graph capture of {self.name} failed ({type(e).__name__}: {e}); running it without "
                      "a graph from now on (slower, same results).", flush=True)
                torch.cuda.synchronize()
                return self.update(batch)
        for k, v in batch.items():
            self.static_in[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return self.static_out


def speed_up(update: Callable[[Batch], Batch], compile: bool, cudagraphs: bool, name: str = "update",
             mode: str | None = None) -> Callable[[Batch], Batch]:
    """`update` itself (eager), compiled with `torch.compile`, and/or captured as a CUDA graph."""
    if compile:
        update = torch.compile(update, mode=mode)
    if cudagraphs:
        update = CudaGraphUpdate(update, name=name)
    return update


def resolve_speed_flags(compile: bool | None, cudagraphs: bool | None, device: torch.device) -> tuple[bool, bool]:
    """None means "where it pays": both on with CUDA, both off on the CPU. CUDA graphs need CUDA."""
    on_gpu = device.type == "cuda"
    compile = on_gpu if compile is None else compile
    cudagraphs = on_gpu if cudagraphs is None else cudagraphs
    if cudagraphs and not on_gpu:
        print("--cudagraphs needs CUDA; running without CUDA graphs on the CPU.", flush=True)
        cudagraphs = False
    return compile, cudagraphs
