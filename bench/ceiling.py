"""The hardware ceiling for a decode step: weight bytes over the measured copy bandwidth,
and the step time of the model's linear layers alone, graph-captured."""

from __future__ import annotations

import torch

from tandem.engine.model_config import ModelConfig


def copy_bandwidth_bytes_per_s(nbytes: int = 2 << 30, iters: int = 10) -> float:
    """Device-to-device copy; counts bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    return 2 * nbytes / seconds


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return cfg.num_parameters() * torch.tensor([], dtype=dtype).element_size()


@torch.inference_mode()
def linear_layers_step_s(
    model: torch.nn.Module, batch: int, iters: int = 50, engine_ops: bool = False
) -> float:
    """Seconds per replay of every matmul of one decode step (no attention, norms or
    activations) over the model's own weights, captured in one CUDA graph: what a
    perfect engine still has to pay. The matmuls are cuBLAS's (torch's F.linear), or
    with `engine_ops` the engine's own (its GEMV kernel at batch 1)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype, dev = layers[0].weight.dtype, layers[0].weight.device
    inputs = {
        m.in_features: torch.randn(batch, m.in_features, dtype=dtype, device=dev) for m in layers
    }

    def step() -> None:
        for m in layers:
            x = inputs[m.in_features]
            if engine_ops:
                m(x)
            else:
                torch.nn.functional.linear(x, m.weight)

    for _ in range(3):
        step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters
