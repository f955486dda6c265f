"""The two ceilings every figure is judged against, measured on the card as found (METHOD.md): the
device-to-device copy bandwidth (bytes read + bytes written) and the bf16 matrix-product rate on
random data."""
from __future__ import annotations

import functools
from typing import List

import torch

from gpucheck.common import Env, Row, median_ms


def run(env: Env) -> List[Row]:
    dev = env.device
    g = torch.Generator(device=dev).manual_seed(0)
    elems = (1 << 28) if env.cuda else (1 << 16)  # 1 GiB of fp32 each way on a GPU: far past the L2
    src = torch.rand(elems, generator=g, device=dev)
    dst = torch.empty_like(src)
    ms = median_ms(functools.partial(dst.copy_, src), env)
    copy_gbps = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    del src, dst
    n = 8192 if env.cuda else 64
    a = torch.randn(n, n, generator=g, device=dev).to(torch.bfloat16)
    b = torch.randn(n, n, generator=g, device=dev).to(torch.bfloat16)
    ms_mm = median_ms(lambda: a @ b, env)
    tflops = 2 * n ** 3 / (ms_mm * 1e-3) / 1e12
    return [Row(f"copy bandwidth ({elems * 4 / 2**20:.0f} MiB fp32, read + write)", None, copy_gbps, "GB/s"),
            Row(f"bf16 matmul {n}x{n}x{n}, random data", None, tflops, "TFLOP/s")]
