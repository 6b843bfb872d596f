"""Every kernel compiles for an H100 (sm_90) with the real Triton compiler, no GPU needed.

The interpreter runs the kernels but cannot catch what only the compiler rejects (dot
shapes, loop-carried types, pointer casts) or register spills; this runs the
production (bf16, head_dim 128) shapes through tests/kernels/sm90_compile.py in a child
process, since this process imported the kernels in interpreter mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "TRITON_CACHE_DIR": str(tmp_path),
        "TRITON_DEFAULT_FP_FUSION": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.sm90_compile", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "REG:" in line]
    names = {line.split()[0] for line in lines}
    assert names == {
        "_decode_split_kernel",
        "_decode_reduce_kernel",
        "_prefill_kernel",
        "_rotary_store_kv_kernel",
        "_rotary_decode_kernel",
        "_rms_norm_kernel",
        "_silu_mul_kernel",
        "_kv_block_transfer_kernel",
    }, proc.stdout
    spills = [line for line in lines if "STACK:0 " not in line]
    assert not spills, "register spills on sm_90:\n" + "\n".join(spills)
    # The KV transfer copy is bandwidth-bound: every access must be a 16-byte vector.
    assert any("_kv_block_transfer_kernel" in ln and "v4=1" in ln for ln in lines), proc.stdout
    # The long-prefill tile must use Hopper's warpgroup MMA, not the Ampere fallback.
    assert any(
        "_prefill_kernel" in ln and "BLOCK_M': 128" in ln and "wgmma=1" in ln for ln in lines
    ), proc.stdout
