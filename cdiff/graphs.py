"""A function captured once in a CUDA graph, replayed for new inputs of the same shapes.

A CUDA graph records every kernel a function launches, with its memory addresses, and replays
the whole recording with one launch: no Python, no per-kernel launch cost. It fits work whose
shapes and control flow never change, such as the sampling loop (cdiff.samplers: no host sync,
no data-dependent branch). The price: the inputs must be copied into the buffers the graph
read at capture, the outputs live in buffers the next replay overwrites (so they are cloned),
and the graph holds its memory pool while it is kept.

``Pipeline.translate(..., cuda_graph=True)`` runs its sampling loop through ``CapturedFunction``.
"""

from __future__ import annotations

from typing import Callable

import torch

Capture = Callable[[Callable, tuple], tuple[Callable[[], None], tuple]]


def cuda_graph_capture(fn: Callable, static_inputs: tuple[torch.Tensor, ...]):
    """(replay, static outputs) of ``fn(*static_inputs)`` recorded in a CUDA graph.

    ``fn`` runs once first on a side stream (capture needs a warmed-up function: lazy
    initialisation, tables copied to the device, cuBLAS workspaces), then once under capture.
    """
    if not all(t.is_cuda for t in static_inputs):
        raise ValueError("cuda_graph=True needs the model on a CUDA device; on the CPU, run without it")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outputs = fn(*static_inputs)
    return graph.replay, tuple(static_outputs)


def eager_capture(fn: Callable, static_inputs: tuple[torch.Tensor, ...]):
    """A stand-in for ``cuda_graph_capture`` on the CPU: "replay" runs ``fn`` again on the static
    inputs and writes into the same output buffers, so the buffer handling is testable anywhere."""
    static_outputs = tuple(fn(*static_inputs))

    def replay() -> None:
        for buffer, value in zip(static_outputs, fn(*static_inputs)):
            buffer.copy_(value)

    return replay, static_outputs


class CapturedFunction:
    """``fn(*inputs) -> tuple of tensors`` captured once (by ``capture``) on static copies of
    ``example_inputs``; each call copies its inputs into those buffers, replays, and returns
    clones of the static outputs (the next replay overwrites the buffers).

    ``fn`` must read its tensors only from its arguments (anything else it reads is frozen at
    capture) and must not branch on their values.
    """

    def __init__(self, fn: Callable, example_inputs: tuple[torch.Tensor, ...], capture: Capture = cuda_graph_capture):
        self.static_inputs = tuple(t.detach().clone() for t in example_inputs)
        self.replay, self.static_outputs = capture(fn, self.static_inputs)

    def accepts(self, inputs: tuple[torch.Tensor, ...]) -> bool:
        """Whether ``inputs`` fit the static buffers (shape, dtype, device)."""
        return len(inputs) == len(self.static_inputs) and all(
            (x.shape, x.dtype, x.device) == (s.shape, s.dtype, s.device) for x, s in zip(inputs, self.static_inputs)
        )

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.accepts(inputs):
            raise ValueError("CapturedFunction: the inputs' shapes, dtypes or devices differ from the captured ones")
        for buffer, value in zip(self.static_inputs, inputs):
            buffer.copy_(value)
        self.replay()
        return tuple(out.clone() for out in self.static_outputs)
