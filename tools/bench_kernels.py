#!/usr/bin/env python
"""Microbenchmarks of megacpm.kernels against PyTorch eager, on the shapes of MiniCPM-1.2B and 2.4B.

  python tools/bench_kernels.py                      # CUDA: CSV on stdout
  python tools/bench_kernels.py --csv kernels.csv --tokens 8192 --model 2.4B
  python tools/bench_kernels.py --cpu --tokens 1024  # the CPU memory comparison, even with CUDA
  python tools/bench_kernels.py --kernel grouped_matmul --experts 8 --top-k 2   # the MoE grouped GEMM only
  TRITON_INTERPRET=1 python tools/bench_kernels.py --kernel grouped_matmul --tokens 64 --hidden 32 --intermediate 64

With CUDA, per model shape and token count, each kernel in bf16 with impl="triton" and its eager baselines:
  rms_norm                    vs F.rms_norm (eps 1e-5, x [tokens, hidden])
  rotary (on q)               vs a plain torch rotate-half (q [tokens/4096, 4096, heads, 64], fp32 cos/sin)
  cross_entropy               vs F.cross_entropy((logits * scale).float()), logits [tokens, vocab]
  fused_linear_cross_entropy  vs F.linear_cross_entropy(hidden * scale, weight, labels), both its
                              reference path (options=None: materialised logits, "eager-materialised")
                              and its chunked one (LinearCrossEntropyOptions(): "eager-chunked")
  grouped_matmul              the MoE experts' gate/up projection: x [tokens * top_k, hidden] sorted by
                              expert, weight [experts, intermediate, hidden], ragged counts (skewed loads,
                              every fourth expert from the second on empty), vs "torch-loop" (impl="torch":
                              one matmul per expert with rows) and "dense" (one x @ W.T with W [intermediate,
                              hidden]: the same FLOPs, what the grouped kernel could at best approach);
                              before timing, triton's output and gradients are checked against torch-loop's
with scale = muP's 1/m (m = hidden / 256). Passes: "fwd" (inputs without gradients) and "fwd+bwd".
grouped_matmul's shape is the model's hidden and intermediate sizes with --experts (8) and --top-k (2)
(MiniCPM-MoE-8x2B on the 2.4B shape); its rows are labelled e.g. "MiniCPM-2.4B-8x-top2".
CSV columns:
  median_ms         triton.testing.do_bench, median
  floor_bytes       the fewest bytes the pass must move: rms_norm fwd reads x, w and writes y, fwd+bwd also
                    reads x, w, dy and writes dx, dw; rotary reads q, cos, sin and writes the output (twice
                    that with the backward); cross_entropy reads logits and labels (fwd+bwd also writes
                    dlogits); fused_linear_cross_entropy reads hidden, weight, labels (fwd+bwd also writes
                    dhidden, dweight). The [tokens, vocab] logits of the fused kernel are not counted.
                    grouped_matmul fwd reads x, weight and writes y, fwd+bwd moves 3x, 3 weight, 2y
                    (the dense row's weight is its one [intermediate, hidden] matrix)
  gbps              floor_bytes / median time (1e9 bytes/s)
  tflops            FLOPs / median time (1e12/s), grouped_matmul only: 2 * rows * N * K a matmul, fwd one,
                    fwd+bwd three (y, dx, dW); empty otherwise
  speedup_vs_eager  how many times faster impl=triton is: on an eager row, than that baseline; on the
                    triton row, than the fastest eager baseline
  peak_mem_mb       torch.cuda.max_memory_allocated during one call minus the memory allocated before it
                    (the inputs), MiB; includes the outputs and the gradients

Without CUDA (or with --cpu) GPU timings are not measured; instead the loss + backward of the LM head
(fp32, default tokens 4096, hidden 2304, vocab 122753: MiniCPM-2.4B) is compared for three variants,
each in its own fresh process (this script with --worker):
  materialised   F.cross_entropy((hidden @ weight.T) * scale, labels)
  torch-chunked  F.linear_cross_entropy(hidden * scale, weight, labels, options=LinearCrossEntropyOptions())
  ours           megacpm.kernels.fused_linear_cross_entropy(hidden, weight, labels, logit_scale=scale,
                                                            impl="torch")
reporting the wall time of forward + backward (median of --repeats runs after --warmup runs), the peak
RSS above the inputs (ru_maxrss at the end minus the RSS once hidden, weight and labels are allocated:
it counts the gradients and every temporary), whether the losses and gradient norms agree, and the
targets: ours <= 0.30x the materialised peak, <= 1.0x the torch-chunked peak, time <= 1.0x torch-chunked.
--csv PATH writes that table's rows (with shape, tokens, hidden, vocab, dtype). The exit status is 1 when
the variants disagree.

Without CUDA, grouped_matmul is also measured on the CPU (fp32, in this process, median of --repeats
timed calls after --warmup): torch-loop and dense always, triton only under TRITON_INTERPRET=1 (Triton's
CPU interpreter: its time is the interpreter's, a check that the kernel runs and agrees, not a speed)
and only at shapes small enough to interpret (otherwise a line says why it is skipped). The table gives
each impl's median time and how many times faster it is than torch-loop and than dense; the CSV rows
have the CUDA rows' columns (gbps, tflops and peak_mem_mb empty). The exit status is 1 when triton and
torch-loop disagree.

--kernel NAME... picks the kernels (default: all); on the CPU, fused_linear_cross_entropy is the LM-head
comparison above, grouped_matmul this one, and the others have no CPU measurement. A CSV with both CPU
tables has the union of their columns.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    from torch.nn import LinearCrossEntropyOptions  # noqa: E402
except ImportError:  # where torch 2.13 defines it, when torch.nn does not export it
    try:
        from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions  # noqa: E402
    except ImportError:  # an older torch (no chunked F.linear_cross_entropy): its baseline is left out
        LinearCrossEntropyOptions = None

from megacpm import kernels  # noqa: E402
from megacpm.kernels.dispatch import interpreter_enabled, triton_available  # noqa: E402

DIM_MODEL_BASE = 256  # muP: m = hidden / dim_model_base, logits scaled by 1/m
HEAD_DIM = 64
SEQ_LEN = 4096
RMS_EPS = 1e-5
GPU_TOKENS = (4096, 8192, 16384)
CPU_TOKENS = (4096,)
MiB = 2**20
AGREE_RTOL = 1e-4  # fp32 losses and gradient norms of the three CPU variants
TARGETS = (  # (what, ratio key, bound) for "ours" in the CPU comparison
    ("peak <= 0.30x materialised", "peak_vs_materialised", 0.30),
    ("peak <= 1.00x torch-chunked", "peak_vs_torch_chunked", 1.00),
    ("time <= 1.00x torch-chunked", "time_vs_torch_chunked", 1.00),
)
MOE_EXPERTS, MOE_TOP_K = 8, 2  # MiniCPM-MoE-8x2B
INTERMEDIATE_RATIO = 2.5  # MiniCPM's intermediate / hidden, for a custom --hidden without --intermediate
AGREE_REL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # triton vs torch-loop, max|d|/max|ref|
# Triton's CPU interpreter runs ~5 ms per 16x16x16 tile product: above this many a forward pass (the
# backward is about twice that), the triton side is skipped on the CPU rather than run for minutes.
INTERPRETER_MAX_TILE_PRODUCTS = 1024
KERNEL_NAMES = ("rms_norm", "rotary", "cross_entropy", "fused_linear_cross_entropy", "grouped_matmul")
CPU_KERNELS = ("fused_linear_cross_entropy", "grouped_matmul")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    heads: int
    vocab: int
    intermediate: int = 0  # grouped_matmul only (0: INTERMEDIATE_RATIO x hidden)
    experts: int = MOE_EXPERTS
    top_k: int = MOE_TOP_K
    custom: bool = False  # from --hidden/--vocab/--intermediate rather than a model

    def __post_init__(self):
        if not self.intermediate:
            object.__setattr__(self, "intermediate", round(INTERMEDIATE_RATIO * self.hidden))

    @property
    def moe_name(self) -> str:
        """grouped_matmul's label: e.g. MiniCPM-2.4B-8x-top2, or h64-i160-4x-top2 for a custom shape."""
        base = f"h{self.hidden}-i{self.intermediate}" if self.custom else self.name
        return f"{base}-{self.experts}x-top{self.top_k}"

    @property
    def logit_scale(self) -> float:
        return 1.0 / max(1.0, self.hidden / DIM_MODEL_BASE)


MODELS = {"1.2B": Shape("MiniCPM-1.2B", 1536, 24, 73440, 3840),
          "2.4B": Shape("MiniCPM-2.4B", 2304, 36, 122753, 5760)}


def custom_shape(hidden: int, vocab: int, intermediate: int) -> Shape:
    return Shape(f"h{hidden}-v{vocab}", hidden, max(1, hidden // HEAD_DIM), vocab, intermediate, custom=True)


def sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits (for the printed and CSV figures)."""
    return float(f"{x:.{digits}g}")


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def write_csv(rows: list[dict], path: str | None) -> None:
    """rows as CSV to path, or to stdout when path is None; the columns are the union of the rows' keys
    (first seen first), a row's missing ones empty."""
    if path is None:
        _write_rows(rows, sys.stdout)
        return
    with open(path, "w", newline="") as f:
        _write_rows(rows, f)
    print(f"wrote {len(rows)} rows to {path}")


def _write_rows(rows: list[dict], f) -> None:
    writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)),
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


# ---------------------------------------------------------------------------------------------------
# CUDA: the kernels against eager PyTorch

@dataclasses.dataclass
class Case:
    """One kernel on one shape: its inputs, which of them get gradients, the byte floors, the impls."""
    kernel: str
    inputs: tuple[torch.Tensor, ...]
    differentiable: tuple[int, ...]
    floor_bytes: dict[str, int]  # pass -> bytes
    impls: dict[str, Callable[..., torch.Tensor]]  # "triton" first, then the eager baselines
    flops: dict[str, int] | None = None  # pass -> FLOPs, where the kernel is a matmul (the tflops column)
    impl_floor_bytes: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # impl -> pass -> bytes
    reference: str | None = None  # the impl triton's output and gradients are checked against before timing
    label: str | None = None  # the rows' "shape", when it is more than the model's name
    input_names: tuple[str, ...] = ()  # for the agreement check's line


def rotary_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain rotate-half in x's dtype: cat(x1*cos - x2*sin, x2*cos + x1*sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # [seq, 1, head_dim/2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def rms_norm_case(shape: Shape, tokens: int, device, dtype, gen) -> Case:
    x = torch.randn(tokens, shape.hidden, device=device, dtype=dtype, generator=gen)
    w = 1 + 0.1 * torch.randn(shape.hidden, device=device, dtype=dtype, generator=gen)
    return Case("rms_norm", (x, w), (0, 1),
                {"fwd": 2 * nbytes(x) + nbytes(w), "fwd+bwd": 5 * nbytes(x) + 3 * nbytes(w)},
                {"triton": lambda x, w: kernels.rms_norm(x, w, RMS_EPS, impl="triton"),
                 "eager": lambda x, w: F.rms_norm(x, (shape.hidden,), w, RMS_EPS)})


def rotary_case(shape: Shape, tokens: int, device, dtype, gen) -> Case:
    batch, seq = (tokens // SEQ_LEN, SEQ_LEN) if tokens % SEQ_LEN == 0 else (1, tokens)
    q = torch.randn(batch, seq, shape.heads, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    angles = torch.rand(seq, HEAD_DIM // 2, device=device, generator=gen) * seq
    cos, sin = angles.cos(), angles.sin()
    fwd = 2 * nbytes(q) + nbytes(cos, sin)
    return Case("rotary", (q, cos, sin), (0,), {"fwd": fwd, "fwd+bwd": 2 * fwd},
                {"triton": lambda q, c, s: kernels.rotary(q, c, s, impl="triton"), "eager": rotary_eager})


def cross_entropy_case(shape: Shape, tokens: int, device, dtype, gen) -> Case:
    scale = shape.logit_scale
    logits = 4 * torch.randn(tokens, shape.vocab, device=device, dtype=dtype, generator=gen)
    labels = torch.randint(shape.vocab, (tokens,), device=device, generator=gen)
    return Case("cross_entropy", (logits, labels), (0,),
                {"fwd": nbytes(logits, labels), "fwd+bwd": 2 * nbytes(logits) + nbytes(labels)},
                {"triton": lambda z, y: kernels.cross_entropy(z, y, logit_scale=scale, impl="triton"),
                 "eager": lambda z, y: F.cross_entropy((z * scale).float(), y)})


def fused_linear_cross_entropy_case(shape: Shape, tokens: int, device, dtype, gen) -> Case:
    scale = shape.logit_scale
    hidden, weight, labels = lm_head_inputs(tokens, shape.hidden, shape.vocab, device, dtype, gen)
    impls = {"triton": lambda h, w, y: kernels.fused_linear_cross_entropy(h, w, y, logit_scale=scale, impl="triton")}
    if hasattr(F, "linear_cross_entropy"):
        impls["eager-materialised"] = lambda h, w, y: F.linear_cross_entropy(h * scale, w, y)
    else:  # an older torch: the same materialised logits by hand
        impls["eager-materialised"] = lambda h, w, y: loss_materialised(h, w, y, scale)
    if LinearCrossEntropyOptions is not None and hasattr(F, "linear_cross_entropy"):
        impls["eager-chunked"] = lambda h, w, y: F.linear_cross_entropy(h * scale, w, y,
                                                                        options=LinearCrossEntropyOptions())
    return Case("fused_linear_cross_entropy", (hidden, weight, labels), (0, 1),
                {"fwd": nbytes(hidden, weight, labels), "fwd+bwd": 2 * nbytes(hidden, weight) + nbytes(labels)},
                impls)


def ragged_counts(rows: int, groups: int, seed: int = 0) -> torch.Tensor:
    """int64 [groups] on the CPU summing to rows: skewed loads (exponential shares), every fourth group
    from the second on (1, 5, 9, ...) empty: what a router's counts look like, with the empty groups the
    kernel must skip."""
    share = -torch.rand(groups, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).log()
    if groups >= 2:
        share[1::4] = 0
    counts = (share / share.sum() * rows).floor().to(torch.int64)
    counts[int(share.argmax())] += rows - int(counts.sum())
    return counts


def grouped_matmul_case(shape: Shape, tokens: int, device, dtype, gen) -> Case:
    """The experts' gate/up projection of tokens * top_k routed rows: N = intermediate, K = hidden. The
    inputs are (x, weight, counts, dense weight); each impl reads only its own."""
    rows, n, k = tokens * shape.top_k, shape.intermediate, shape.hidden
    x = torch.randn(rows, k, device=device, dtype=dtype, generator=gen)
    w = torch.randn(shape.experts, n, k, device=device, dtype=dtype, generator=gen).mul_(k ** -0.5)
    w_dense = torch.randn(n, k, device=device, dtype=dtype, generator=gen).mul_(k ** -0.5)
    counts = ragged_counts(rows, shape.experts).to(device)
    y_bytes = rows * n * x.element_size()

    def floors(weight):
        return {"fwd": nbytes(x, weight) + y_bytes, "fwd+bwd": 3 * nbytes(x, weight) + 2 * y_bytes}
    matmul = 2 * rows * n * k
    return Case("grouped_matmul", (x, w, counts, w_dense), (0, 1, 3), floors(w),
                {"triton": lambda x, w, c, wd: kernels.grouped_matmul(x, w, c, impl="triton"),
                 "torch-loop": lambda x, w, c, wd: kernels.grouped_matmul(x, w, c, impl="torch"),
                 "dense": lambda x, w, c, wd: x @ wd.t()},
                flops={"fwd": matmul, "fwd+bwd": 3 * matmul}, impl_floor_bytes={"dense": floors(w_dense)},
                reference="torch-loop", label=shape.moe_name, input_names=("x", "weight", "counts", "dense weight"))


CASES = (rms_norm_case, rotary_case, cross_entropy_case, fused_linear_cross_entropy_case)  # what gpucheck runs
CASES_BY_NAME = {**{build.__name__.removesuffix("_case"): build for build in CASES},
                 "grouped_matmul": grouped_matmul_case}
assert tuple(CASES_BY_NAME) == KERNEL_NAMES


def make_step(fn, case: Case, backward: bool):
    """A no-argument callable running one pass of fn on the case's inputs, and the tensors whose .grad
    it fills (to reset between calls)."""
    if not backward:
        return (lambda: fn(*case.inputs)), []
    leaves = [t.detach().requires_grad_(i in case.differentiable) for i, t in enumerate(case.inputs)]
    out = fn(*case.inputs)
    grad_out = torch.randn_like(out) if out.ndim else None

    def step():
        fn(*leaves).backward(grad_out)
    return step, [leaves[i] for i in case.differentiable]


def time_ms(step, grads) -> float:
    import triton.testing  # local: triton exists only on GPU machines
    return triton.testing.do_bench(step, grad_to_none=grads, return_mode="median")


def peak_bytes(step, grads) -> int:
    """Peak CUDA memory of one call above what was allocated before it."""
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure_case(case: Case, shape: Shape, tokens: int, dtype, timer=None, peak=None, rates: bool = True) -> list[dict]:
    """One row per pass and impl. ``timer(step, grads)`` -> ms (default: triton.testing.do_bench) and
    ``peak(step, grads)`` -> bytes (default: CUDA's peak; None in the row when ``rates`` is off, as are
    gbps and tflops: the CPU's rows)."""
    timer = timer or time_ms
    peak = peak or peak_bytes
    rows = []
    for pass_name, floor in case.floor_bytes.items():
        group = []
        for impl, fn in case.impls.items():
            step, grads = make_step(fn, case, backward=pass_name == "fwd+bwd")
            ms = timer(step, grads)
            impl_floor = case.impl_floor_bytes.get(impl, {}).get(pass_name, floor)
            flops = case.flops[pass_name] if case.flops else None
            group.append({"kernel": case.kernel, "shape": case.label or shape.name, "tokens": tokens,
                          "dtype": str(dtype).removeprefix("torch."), "pass": pass_name, "impl": impl,
                          "median_ms": sig(ms), "gbps": sig(impl_floor / (ms * 1e-3) / 1e9) if rates else None,
                          "tflops": sig(flops / (ms * 1e-3) / 1e12) if rates and flops else None,
                          "floor_bytes": impl_floor, "speedup_vs_eager": None,
                          "peak_mem_mb": sig(peak(step, grads) / MiB) if rates else None})
            del step, grads
        add_speedups(group)
        rows += group
    return rows


def add_speedups(group: list[dict]) -> None:
    """group[0] is the triton row, the others its eager baselines (see the module docstring); without a
    triton row (skipped on the CPU) there is nothing to compare against and the column stays empty."""
    if len(group) < 2 or group[0]["impl"] != "triton":
        return
    triton_ms = group[0]["median_ms"]
    for row in group[1:]:
        row["speedup_vs_eager"] = sig(row["median_ms"] / triton_ms)
    group[0]["speedup_vs_eager"] = min(row["speedup_vs_eager"] for row in group[1:])


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (fp64), 0 for two empty tensors."""
    if want.numel() == 0:
        return 0.0
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def check_agreement(case: Case) -> tuple[bool, str]:
    """Whether triton's output, and its gradients of the differentiable inputs it reads, match
    case.reference's (max relative error within AGREE_REL of the dtype), and a line saying so."""
    dtype = case.inputs[0].dtype
    errors = {}
    grad_out = None
    results = {}
    for impl in ("triton", case.reference):
        leaves = [t.detach().clone().requires_grad_(i in case.differentiable) for i, t in enumerate(case.inputs)]
        out = case.impls[impl](*leaves)
        if grad_out is None:
            grad_out = torch.randn(out.shape, dtype=out.dtype, device=out.device,
                                   generator=torch.Generator(device=out.device).manual_seed(1))
        out.backward(grad_out)
        results[impl] = [out.detach()] + [leaves[i].grad for i in case.differentiable]
    names = ["out"] + [f"d{case.input_names[i]}" if i < len(case.input_names) else f"d(input {i})"
                       for i in case.differentiable]
    for name, got, want in zip(names, results["triton"], results[case.reference]):
        if got is not None and want is not None:  # an input neither impl reads has no gradient
            errors[name] = max_rel_error(got, want)
    tolerance = AGREE_REL.get(dtype, 1e-4)
    agree = all(e <= tolerance for e in errors.values())
    line = (f"{case.kernel} ({case.label}): triton {'agrees with' if agree else 'DISAGREES with'} "
            f"{case.reference}: max |difference| / max |reference| "
            + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()) + f" (tolerance {tolerance:.0e})")
    return agree, line


def run_gpu(shapes: list[Shape], token_counts: list[int], device, dtype=torch.bfloat16,
            kernel_names=KERNEL_NAMES) -> tuple[list[dict], bool]:
    """The rows of every selected kernel, shape and token count, and whether every checked kernel agreed
    with its reference (the checks' lines go to stderr, with the progress)."""
    rows, agree = [], True
    gen = torch.Generator(device=device).manual_seed(0)
    for shape in shapes:
        for tokens in token_counts:
            print(f"{shape.name}, {tokens} tokens ...", file=sys.stderr, flush=True)
            for name in kernel_names:
                case = CASES_BY_NAME[name](shape, tokens, device, dtype, gen)
                if case.reference is not None:
                    case_agrees, line = check_agreement(case)
                    print(line, file=sys.stderr, flush=True)
                    agree = agree and case_agrees
                rows += measure_case(case, shape, tokens, dtype)
                del case
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return rows, agree


# ---------------------------------------------------------------------------------------------------
# Without CUDA: the LM-head loss + backward on the CPU, peak memory and time, one process per variant

def loss_materialised(hidden, weight, labels, scale):
    return F.cross_entropy((hidden @ weight.t()) * scale, labels)


def loss_torch_chunked(hidden, weight, labels, scale):
    return F.linear_cross_entropy(hidden * scale, weight, labels, options=LinearCrossEntropyOptions())


def loss_ours(hidden, weight, labels, scale):
    return kernels.fused_linear_cross_entropy(hidden, weight, labels, logit_scale=scale, impl="torch")


VARIANTS = {"materialised": loss_materialised, "torch-chunked": loss_torch_chunked, "ours": loss_ours}


def lm_head_inputs(tokens: int, hidden: int, vocab: int, device, dtype, gen):
    """hidden ~ N(0, 1), weight ~ N(0, 0.1^2) (MiniCPM's init_std), random labels; made in place, so that
    no transient copy raises the process's peak memory."""
    h = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=gen)
    w = torch.randn(vocab, hidden, device=device, dtype=dtype, generator=gen).mul_(0.1)
    y = torch.randint(vocab, (tokens,), device=device, generator=gen)
    return h, w, y


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; elsewhere the peak so far, an upper bound)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return max_rss_bytes()


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def run_worker(variant: str, shape: Shape, tokens: int, warmup: int, repeats: int) -> dict:
    """Runs in a fresh process: loss + backward of one variant, timed, with its peak RSS above the inputs."""
    loss_fn = VARIANTS[variant]
    hidden, weight, labels = lm_head_inputs(tokens, shape.hidden, shape.vocab, "cpu", torch.float32,
                                            torch.Generator().manual_seed(0))
    hidden.requires_grad_()
    weight.requires_grad_()
    gc.collect()
    base = rss_bytes()
    times = []
    for i in range(warmup + repeats):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        loss = loss_fn(hidden, weight, labels, shape.logit_scale)
        loss.backward()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"variant": variant, "time_s": statistics.median(times), "peak_extra_bytes": max_rss_bytes() - base,
            "loss": loss.item(), "grad_hidden_norm": hidden.grad.norm().item(),
            "grad_weight_norm": weight.grad.norm().item()}


def spawn_worker(variant: str, shape: Shape, tokens: int, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--tokens", str(tokens),
           "--hidden", str(shape.hidden), "--vocab", str(shape.vocab),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise SystemExit(f"bench_kernels.py: worker {variant!r} failed (exit {result.returncode}): {tail}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def max_rel_diff(values: list[float]) -> float:
    ref = max(abs(v) for v in values) or 1.0
    return (max(values) - min(values)) / ref


def compare_on_cpu(shape: Shape, tokens: int, args) -> tuple[list[dict], bool]:
    """The three variants on one shape: prints the table, returns its rows and whether they agree."""
    res = {v: spawn_worker(v, shape, tokens, args) for v in VARIANTS}
    mat, chunked = res["materialised"], res["torch-chunked"]
    rows = [{"shape": shape.name, "tokens": tokens, "hidden": shape.hidden, "vocab": shape.vocab,
             "dtype": "float32", "variant": v, "time_s": sig(r["time_s"]),
             "peak_extra_mib": sig(r["peak_extra_bytes"] / MiB),
             "peak_vs_materialised": sig(r["peak_extra_bytes"] / max(mat["peak_extra_bytes"], 1)),
             "peak_vs_torch_chunked": sig(r["peak_extra_bytes"] / max(chunked["peak_extra_bytes"], 1)),
             "time_vs_torch_chunked": sig(r["time_s"] / chunked["time_s"]), "loss": r["loss"]}
            for v, r in res.items()]
    print_cpu_table(shape, tokens, rows)
    diffs = {k: max_rel_diff([r[k] for r in res.values()]) for k in ("loss", "grad_hidden_norm", "grad_weight_norm")}
    agree = all(d <= AGREE_RTOL for d in diffs.values())
    print(f"variants {'agree' if agree else 'DISAGREE'}: max relative difference "
          + ", ".join(f"{k} {d:.1e}" for k, d in diffs.items()) + f" (tolerance {AGREE_RTOL:.0e})")
    ours = next(row for row in rows if row["variant"] == "ours")
    print("targets for ours: " + "; ".join(f"{what}: {ours[key]:.2f}x {'met' if ours[key] <= bound else 'NOT met'}"
                                           for what, key, bound in TARGETS))
    return rows, agree


def print_cpu_table(shape: Shape, tokens: int, rows: list[dict]) -> None:
    params = 4 * (tokens * shape.hidden + shape.vocab * shape.hidden)  # fp32 hidden + weight, and their grads
    print(f"\n{shape.name}: tokens {tokens}, hidden {shape.hidden}, vocab {shape.vocab}, fp32, "
          f"logit_scale 1/{1 / shape.logit_scale:g}; loss + backward, each variant in a fresh process")
    print(f"peak_extra_mib = peak RSS (ru_maxrss) minus the RSS after allocating the inputs (hidden + weight "
          f"{params / MiB:.1f} MiB, labels {8 * tokens / MiB:.2f} MiB): it counts the gradients "
          f"({params / MiB:.1f} MiB) and every temporary")
    cols = ("variant", "time_s", "peak_extra_mib", "peak_vs_materialised", "peak_vs_torch_chunked",
            "time_vs_torch_chunked", "loss")
    widths = [max(len(c), 13) for c in cols]
    print("  ".join(f"{c:>{w}}" for c, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(f"{row[c]:>{w}.6g}" if isinstance(row[c], float) else f"{row[c]:>{w}}"
                        for c, w in zip(cols, widths)))


# ---------------------------------------------------------------------------------------------------
# Without CUDA: grouped_matmul on the CPU (torch-loop and dense; triton under the interpreter)

def cpu_timer(warmup: int, repeats: int):
    """A timer for measure_case: the median wall time of ``repeats`` calls after ``warmup`` untimed ones, ms."""
    def timer(step, grads) -> float:
        times = []
        for i in range(warmup + repeats):
            for t in grads:
                t.grad = None
            start = time.perf_counter()
            step()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3
    return timer


def interpreted_tile_products(shape: Shape, tokens: int) -> int:
    """The 16x16x16 tile products one forward grouped_matmul takes in Triton's interpreter (its cost)."""
    from megacpm.kernels.grouped_gemm import INTERPRETER_BLOCKS as b
    counts = ragged_counts(tokens * shape.top_k, shape.experts)
    row_tiles = int(((counts + b.block_m - 1) // b.block_m).sum())
    return row_tiles * -(-shape.intermediate // b.block_n) * -(-shape.hidden // b.block_k)


def triton_skip_reason(shape: Shape, tokens: int, cpu_forced: bool) -> str | None:
    """Why the triton side is not run on the CPU, or None when it runs (in the interpreter)."""
    if not triton_available():
        return "the triton package is not installed"
    if not interpreter_enabled():
        where = "--cpu given" if cpu_forced else "no CUDA device"
        return (f"{where} and TRITON_INTERPRET is not 1 (set it for the whole run to run the kernel in "
                f"Triton's CPU interpreter: a check, not a speed)")
    products = interpreted_tile_products(shape, tokens)
    if products > INTERPRETER_MAX_TILE_PRODUCTS:
        return (f"under TRITON_INTERPRET=1 this shape is {products:,} interpreted tile products a forward pass "
                f"(limit {INTERPRETER_MAX_TILE_PRODUCTS:,}, ~5 ms each); pass smaller --tokens, --hidden, "
                f"--intermediate")
    return None


def compare_grouped_on_cpu(shape: Shape, tokens: int, args) -> tuple[list[dict], bool]:
    """grouped_matmul's impls on one shape, fp32 on the CPU: prints the table, returns its rows and
    whether triton (when it ran) agreed with torch-loop."""
    case = grouped_matmul_case(shape, tokens, "cpu", torch.float32, torch.Generator().manual_seed(0))
    counts = case.inputs[2]
    print(f"\n{case.label}: grouped_matmul x [{tokens} tokens x top-{shape.top_k} = {case.inputs[0].shape[0]} rows, "
          f"K {shape.hidden}] @ weight [{shape.experts} experts, N {shape.intermediate}, K {shape.hidden}].T, fp32 "
          f"on the CPU x{torch.get_num_threads()}; rows per expert {counts.tolist()} "
          f"({int((counts == 0).sum())} empty); median of {args.repeats} after {args.warmup}")
    reason = triton_skip_reason(shape, tokens, args.cpu)
    agree = True
    if reason is not None:
        print(f"grouped_matmul: triton skipped: {reason}")
        del case.impls["triton"]
    else:
        print("grouped_matmul: triton runs in Triton's CPU interpreter (TRITON_INTERPRET=1): its time is the "
              "interpreter's, not the kernel's")
        agree, line = check_agreement(case)
        print(line)
    rows = measure_case(case, shape, tokens, torch.float32, timer=cpu_timer(args.warmup, args.repeats), rates=False)
    print_grouped_table(rows)
    return rows, agree


def print_grouped_table(rows: list[dict]) -> None:
    """Per pass and impl: the median time and how many times faster than torch-loop and than dense."""
    ms = {(r["pass"], r["impl"]): r["median_ms"] for r in rows}
    print(f"{'pass':>8}  {'impl':>10}  {'median_ms':>10}  {'x torch-loop':>12}  {'x dense':>8}")
    for r in rows:
        this = r["median_ms"]
        print(f"{r['pass']:>8}  {r['impl']:>10}  {this:>10.4g}  {ms[r['pass'], 'torch-loop'] / this:>12.3g}  "
              f"{ms[r['pass'], 'dense'] / this:>8.3g}")


# ---------------------------------------------------------------------------------------------------
# Command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(prog="bench_kernels.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=sorted(MODELS),
                        help="model shapes (default: both with CUDA, 2.4B on the CPU)")
    parser.add_argument("--tokens", nargs="+", type=_int_at_least(1),
                        help=f"token counts (default: {' '.join(map(str, GPU_TOKENS))} with CUDA, "
                             f"{' '.join(map(str, CPU_TOKENS))} on the CPU)")
    parser.add_argument("--kernel", nargs="+", choices=KERNEL_NAMES,
                        help="the kernels to measure (default: all; on the CPU only "
                             + " and ".join(CPU_KERNELS) + " have a measurement)")
    parser.add_argument("--hidden", type=_int_at_least(1), help="a custom hidden size, in place of --model's")
    parser.add_argument("--vocab", type=_int_at_least(2), help="a custom vocabulary size, in place of --model's")
    parser.add_argument("--intermediate", type=_int_at_least(1),
                        help=f"grouped_matmul: a custom intermediate size (default: --model's, or "
                             f"{INTERMEDIATE_RATIO:g} x a custom --hidden)")
    parser.add_argument("--experts", type=_int_at_least(1), default=MOE_EXPERTS, help="grouped_matmul: experts (groups)")
    parser.add_argument("--top-k", type=_int_at_least(1), default=MOE_TOP_K,
                        help="grouped_matmul: experts per token (rows = tokens x top-k)")
    parser.add_argument("--csv", metavar="PATH", help="write the rows to PATH (default: CUDA rows to stdout)")
    parser.add_argument("--cpu", action="store_true", help="run the CPU comparison even when CUDA is available")
    parser.add_argument("--repeats", type=_int_at_least(1), default=1, help="CPU: timed runs per variant (median)")
    parser.add_argument("--warmup", type=_int_at_least(0), default=1, help="CPU: untimed runs before them")
    parser.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.top_k > args.experts:
        parser.error(f"argument --top-k: {args.top_k} is more than --experts {args.experts}")
    return args


def select_shapes(args, gpu: bool) -> list[Shape]:
    """--model's shapes, or the one custom shape of --hidden/--vocab/--intermediate (the others taken from
    the first model; a custom --hidden without --intermediate has 2.5 x hidden), each with --experts and
    --top-k."""
    models = [MODELS[m] for m in (args.model or (sorted(MODELS) if gpu else ["2.4B"]))]
    if args.hidden is not None or args.vocab is not None or args.intermediate is not None:
        hidden = args.hidden or models[0].hidden
        intermediate = args.intermediate or (models[0].intermediate if args.hidden is None else 0)
        models = [custom_shape(hidden, args.vocab or models[0].vocab, intermediate)]
    return [dataclasses.replace(m, experts=args.experts, top_k=args.top_k) for m in models]


def main(argv=None) -> int:
    args = parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu and args.worker is None
    shapes = select_shapes(args, gpu)
    tokens = args.tokens or list(GPU_TOKENS if gpu else CPU_TOKENS)
    if args.worker:
        print(json.dumps(run_worker(args.worker, shapes[0], tokens[0], args.warmup, args.repeats)))
        return 0
    selected = [k for k in KERNEL_NAMES if k in (args.kernel or KERNEL_NAMES)]
    if gpu:
        rows, agree = run_gpu(shapes, tokens, torch.device("cuda"), kernel_names=selected)
        write_csv(rows, args.csv)
        return 0 if agree else 1
    reason = "--cpu given" if torch.cuda.is_available() else "no CUDA device"
    without = [k for k in selected if k not in CPU_KERNELS]
    if without:
        print(f"{reason}: {', '.join(without)}: no CPU measurement (GPU timings only)")
    rows, agree = [], True
    if "fused_linear_cross_entropy" in selected:
        print(f"{reason}: GPU kernel timings are not measured; measuring the LM-head loss + backward on the CPU")
        for shape in shapes:
            for n in tokens:
                shape_rows, shape_agree = compare_on_cpu(shape, n, args)
                rows += shape_rows
                agree = agree and shape_agree
    if "grouped_matmul" in selected:
        for shape in shapes:
            for n in tokens:
                shape_rows, shape_agree = compare_grouped_on_cpu(shape, n, args)
                rows += shape_rows
                agree = agree and shape_agree
    if args.csv and rows:
        write_csv(rows, args.csv)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
