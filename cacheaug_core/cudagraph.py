"""A training step's forward and backward as one CUDA graph, replayed for every batch.

    step = CapturedStep(lambda ids, pts: loss_fn(ids, pts), params, ids, pts)
    loss = step(ids, pts)          # gradients in p.grad, as after loss.backward()

    cacheaug train --fast --cuda-graph ...      # the trainer's switch (one GPU)

Why: the fast path's step queues ~1,500 kernels from Python (compiled blocks, FlexAttention,
quack's fused MLP GEMMs when installed), and at the reference shape on an H100 the host takes
about as long to queue a step as the GPU takes to run it; a replayed graph is queued in
microseconds. Measured in bench/train_throughput.py's `+graph` paths (results/train_throughput.md):
with the compiled MLP the step is GPU-bound and the graph gains nothing (0.6%); with quack's fused
MLP it is host-bound without the graph (steps of 241-290 ms) and 231 ms with it.
"""

from __future__ import annotations

import torch


class CapturedStep:
    """A training step's forward and backward captured once as a CUDA graph and replayed on
    every batch: the host launches one graph instead of the step's ~1,500 kernels one by one.

        step = CapturedStep(lambda ids, pts: loss_fn(ids, pts), params, ids, pts)
        loss = step(ids, pts)          # gradients in p.grad, as after loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)

    `loss_fn(*inputs)` must take tensors of the captured shapes and synchronise nothing with the
    host (`multi_point_loss` does not). Each call copies the inputs into the graph's own tensors
    and replays it; the loss and the gradients live in the graph's memory and are overwritten by
    the next call (read or step on them first; one batch per optimizer step, no accumulation).
    The optimizer runs outside the graph, so any optimizer and learning-rate schedule works.
    Capture first runs `warmup` steps on a side stream (compilation, cuBLAS workspaces); their
    gradients are dropped."""

    def __init__(self, loss_fn, params, *inputs: torch.Tensor, warmup: int = 2):
        if not torch.cuda.is_available() or any(t.device.type != "cuda" for t in inputs):
            raise ValueError("CapturedStep needs CUDA tensors (CUDA graphs exist on GPUs only)")
        self.params = [p for p in params if p.requires_grad]
        self.inputs = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn_loss = loss_fn(*self.inputs)
                fn_loss.backward()
                # drop the warm-up's autograd graph: alive, it keeps the parameters' gradient
                # accumulators bound to this side stream while the capture runs on another
                # (PyTorch warned of that stream mismatch in a GPU test while it was kept)
                del fn_loss
                for p in self.params:
                    p.grad = None
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params:   # grads made inside the capture: the backward writes, not adds
            p.grad = None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = loss_fn(*self.inputs)
            self.loss.backward()
        self.grads = [p.grad for p in self.params]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for dst, src in zip(self.inputs, inputs):
            if dst.shape != src.shape:
                raise ValueError(f"CapturedStep was captured for inputs of shape {tuple(dst.shape)}, "
                                 f"not {tuple(src.shape)}")
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        for p, g in zip(self.params, self.grads):   # zero_grad(set_to_none=True) dropped them
            p.grad = g
        return self.loss
