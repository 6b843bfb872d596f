"""Compile every kernel for an H100 (sm_90) on a machine without a GPU.

The interpreter checks semantics but accepts things the real compiler rejects (dot
shapes, loop-carried types, pointer casts), so this runs each public wrapper on CPU
tensors with JITFunction.run swapped for "specialize exactly as a launch would, then
compile for sm_90 and stop". Needs TRITON_INTERPRET unset and ptxas (bundled with the
triton wheel); no CUDA driver. Prints per-kernel registers / spills / shared memory
(from cuobjdump) so tile choices can be sanity-checked before the GPU run.

    .venv/bin/python -m tests.kernels.sm90_compile [--quick]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
RESULTS: list[dict] = []


def _compile_only(self: JITFunction, *args, grid, warmup, **kwargs):
    kwargs.setdefault("debug", False)
    backend = make_backend(TARGET)
    binder = create_function_from_signature(self.signature, self.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    start = time.perf_counter()
    kernel = triton.compile(
        ASTSource(self, signature, constexprs, attrs), target=TARGET, options=options.__dict__
    )
    RESULTS.append(
        dict(
            name=self.fn.__name__,
            constexprs={self.arg_names[k[0]]: v for k, v in constexprs.items()},
            seconds=time.perf_counter() - start,
            usage=_resource_usage(kernel.asm["cubin"]),
            shared=kernel.metadata.shared,
            cp_async="cp.async" in kernel.asm["ptx"],
            wgmma="wgmma" in kernel.asm["ptx"],
            # 16-byte loads and stores: what a bandwidth-bound copy needs.
            v4=all(f"{op}.global.v4" in kernel.asm["ptx"] for op in ("ld", "st")),
            num_warps=options.num_warps,
        )
    )
    return kernel


def _resource_usage(cubin: bytes) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", text)
    return f"REG:{match[1]} STACK:{match[2]}" if match else text.strip()


def run_all(quick: bool = False) -> None:
    """Every wrapper at several shapes; `quick`: only the bf16 / head_dim 128 model."""
    from tandem.kernels.decode_attention import paged_decode_attention
    from tandem.kernels.kv_block_transfer import kv_block_transfer
    from tandem.kernels.prefill_attention import paged_prefill_attention
    from tandem.kernels.rmsnorm import fused_add_rms_norm, rms_norm
    from tandem.kernels.rotary import build_cos_sin_cache
    from tandem.kernels.rotary_decode_attention import rotary_decode_attention
    from tandem.kernels.rotary_store_kv import rotary_store_kv
    from tandem.kernels.silu_mul import silu_and_mul

    bf16 = torch.bfloat16
    models = [
        (bf16, 128, 32, 8),  # Llama-3.1-8B
        (bf16, 64, 9, 3),  # SmolLM2-135M
        (torch.float32, 128, 32, 8),
        (bf16, 256, 16, 4),
    ]
    for dtype, head_dim, heads, kv_heads in models[:1] if quick else models:
        cache = torch.zeros(2, 64, 16, kv_heads, head_dim, dtype=dtype)
        tables = torch.zeros(4, 16, dtype=torch.int32)
        ctx = torch.full((4,), 100, dtype=torch.int32)
        q = torch.zeros(4, heads, head_dim, dtype=dtype)
        for splits in (1, 4):
            paged_decode_attention(q, cache, tables, ctx, 0.1, num_splits=splits)
        qsl = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
        paged_prefill_attention(q, cache, tables, qsl, ctx, 0.1, 1)
        long_q = torch.zeros(512, heads, head_dim, dtype=dtype)
        qsl = torch.tensor([0, 512], dtype=torch.int32)
        paged_prefill_attention(long_q, cache, tables[:1], qsl, ctx[:1], 0.1, 512)
        kv = torch.zeros(4, kv_heads, head_dim, dtype=dtype)
        table = build_cos_sin_cache(torch.ones(head_dim // 2), 16)
        positions, slots = torch.zeros(4, dtype=torch.long), torch.arange(4)
        rotary_store_kv(q, kv, kv, positions, table, cache, slots)
        rotary_decode_attention(q, kv, kv, positions, table, cache, tables, ctx, slots, 0.1)
    x = torch.zeros(4, 4096, dtype=bf16)
    rms_norm(x, torch.ones(4096, dtype=bf16), 1e-5)
    fused_add_rms_norm(x, x.clone(), torch.ones(4096, dtype=bf16), 1e-5)
    silu_and_mul(torch.zeros(4, 2 * 14336, dtype=bf16))
    # Llama-3.1-8B blocks between caches of different sizes (the cuda_ipc transfer).
    src = torch.zeros(4, 2, 64, 16, 8, 128, dtype=bf16)
    kv_block_transfer(src, src[:, :, :40].clone(), torch.zeros(2, 7, dtype=torch.int32))


def main(argv: list[str] | None = None) -> None:
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter cannot compile for sm_90")
    JITFunction.run = _compile_only  # type: ignore[method-assign]
    run_all(quick)
    for r in RESULTS:
        shown = {k: v for k, v in r["constexprs"].items() if k.isupper()}
        print(
            f"{r['name']:22s} {r['usage']:18s} smem={r['shared']:<6d} warps={r['num_warps']} "
            f"wgmma={int(r['wgmma'])} cp.async={int(r['cp_async'])} v4={int(r['v4'])} "
            f"{r['seconds']:4.1f}s {shown}"
        )
    print(f"compiled {len(RESULTS)} kernels for sm_90")


if __name__ == "__main__":
    main()
