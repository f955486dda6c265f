"""What every section of tools/gpu_check.py shares: the result rows, the run's environment, timing
and error measures.

A section is a module with ``run(env: Env) -> List[Row]`` (see tools/gpu_check.py). Each row is one
check or one measurement; a check has ``ok`` True/False against its ``target``, a measurement has
``ok`` None. Sections write any bulky output (CSV, traces, logs) under ``env.out_dir``.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[2]

# ||out - ref|| / ||ref|| bounds against an fp64 reference (METHOD.md: fp32 far under 1e-3, the
# matrix units' tf32 near 3e-4, bf16 operands between 1e-3 and 1e-2). Kernels whose fp32 path goes
# through tl.dot (the fused linear cross entropy) get the tf32 bound.
REL_ERROR_BOUNDS = {"float32": 1e-4, "tf32": 2e-3, "bfloat16": 2e-2}

# Datasheet dense bf16 peaks (leads; the measured matmul ceiling is the one that counts).
DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


@dataclass
class Row:
    name: str  # what was checked or measured, with its shape and dtype
    ok: Optional[bool]  # True/False for a check against ``target``; None for a measurement
    value: Optional[float] = None
    unit: str = ""
    target: str = ""  # e.g. "<= 2e-2", ">= 0.8 x copy bandwidth"
    detail: str = ""


@dataclass
class Env:
    """One section's view of the run."""

    rehearsal: bool  # the CPU rehearsal: tiny sizes, Triton interpreter, timings meaningless
    device: torch.device
    out_dir: Path
    ceilings: Dict[str, float] = field(default_factory=dict)  # "copy_gbps", "matmul_bf16_tflops"
    log: Callable[[str], None] = print

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def check(name: str, value: float, bound: float, unit: str = "", detail: str = "", at_least: bool = False) -> Row:
    """A check row: value <= bound (or >= with ``at_least``); NaN never passes."""
    ok = math.isfinite(value) and (value >= bound if at_least else value <= bound)
    return Row(name, ok, value, unit, (">= " if at_least else "<= ") + f"{bound:g}", detail)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; inf when out has a NaN or inf (an unwritten poisoned element)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(out64).all()):
        return math.inf
    denom = float(ref64.norm())
    return float((out64 - ref64).norm()) / (denom if denom > 0 else 1.0)


def poison_allocator(device: torch.device, nbytes: int = 1 << 30) -> None:
    """Fill free memory of the CUDA caching allocator with NaN, so that an output a kernel allocates
    there and fails to write reads back as NaN (METHOD.md: poison outputs before each run)."""
    if device.type != "cuda":
        return
    free = torch.cuda.mem_get_info(device)[0]
    size = min(nbytes, free // 2) // 4
    if size > 0:
        torch.full((size,), float("nan"), dtype=torch.float32, device=device)  # freed into the cache


def median_ms(fn: Callable[[], object], env: Env, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of fn in ms: CUDA events through triton.testing.do_bench on a GPU; on the CPU
    rehearsal a host clock over a few runs (the figure means nothing there)."""
    if env.cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def datasheet_bf16_tflops(device_name: str) -> Optional[float]:
    for key, peak in DATASHEET_BF16_TFLOPS.items():
        if key in device_name:
            return peak
    return None


def write_json(path: Path, payload) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def rows_to_json(rows: List[Row]) -> List[dict]:
    return [asdict(r) for r in rows]
