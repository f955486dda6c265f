"""Kernel benchmarks on the card: the cases of tools/bench_kernels.py (rms_norm, rotary, cross_entropy,
fused_linear_cross_entropy on the MiniCPM-2.4B shape, bf16), each pass ("fwd", "fwd+bwd") timed with
CUDA events (triton.testing.do_bench, median, gradients reset between calls) for impl="triton" and its
baselines: eager PyTorch, torch.compile of that eager code, and Liger-Kernel's equivalent when
liger_kernel imports.

Rows per kernel and pass:
  the triton median (ms), its bytes moved against the byte floor (GB/s) as a fraction of the measured
  copy ceiling: a check >= 0.8 for the memory-bound kernels (rms_norm, rotary, cross_entropy), a
  measurement for the fused linear cross entropy (with its useful TFLOP/s against the matmul ceiling);
  the speedup over each eager baseline and over torch.compile (measurements); over Liger a check
  (>= 0.95: not slower, 5 % for timing noise) when Liger is installed.
For the fused linear cross entropy also the peak memory of one call above its inputs, per impl, and
bench_kernels' targets as checks: peak <= 0.30x materialised logits, <= 1.00x torch's chunked
F.linear_cross_entropy, time <= 1.00x that chunked path (the chunked ones only where the device's
torch has it).

On the CPU rehearsal the same code runs at tiny sizes (Triton interpreted): every figure is a
measurement (ok None) because none means anything there, and torch.compile is skipped (slow on CPU).
Every impl row also goes to OUT/benchmarks/benchmarks.csv and benchmarks.json (the JSON after each
kernel, so a section stopped at its limit keeps what it measured). One token count (16384) on one
shape keeps the section near a minute on an H200, most of it torch.compile; no compile starts after
COMPILE_UNTIL_S and no kernel after STOP_AFTER_S (rows saying so instead).
"""
from __future__ import annotations

import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

import bench_kernels as bk
from gpucheck.common import Env, Row, check, median_ms, write_json

GPU_SHAPE = bk.MODELS["2.4B"]
GPU_TOKENS = 16384  # 4 x 4096: the activations (75 MB in bf16) are past the H200's L2
TINY_SHAPE = bk.Shape("tiny", 64, 1, 256)
TINY_TOKENS = 32
BANDWIDTH_TARGET = 0.8  # of the copy ceiling, for the memory-bound kernels
MEMORY_BOUND = ("rms_norm", "rotary", "cross_entropy")
LIGER_TARGET = 0.95
WARMUP_MS, REP_MS = 25, 150  # do_bench's; the fused fwd+bwd (~40 ms) still gets a few timed calls
COMPILE_UNTIL_S = 80  # no new torch.compile after this many seconds of the section (150 s limit)
STOP_AFTER_S = 120  # no new kernel case after this many seconds


# -- Liger-Kernel (optional) ------------------------------------------------------------------------
def liger_impls(case: bk.Case, shape: bk.Shape) -> Dict[str, Callable]:
    """Liger's equivalent of the case, or {} when liger_kernel is missing or lacks it."""
    try:
        import liger_kernel.transformers.functional as lf
    except Exception:
        return {}
    scale = shape.logit_scale
    if case.kernel == "rms_norm" and hasattr(lf, "liger_rms_norm"):
        return {"liger": lambda x, w: lf.liger_rms_norm(x, w, bk.RMS_EPS)}
    if case.kernel == "cross_entropy" and hasattr(lf, "liger_cross_entropy"):
        return {"liger": lambda z, y: lf.liger_cross_entropy(z * scale, y)}
    if case.kernel == "fused_linear_cross_entropy" and hasattr(lf, "liger_fused_linear_cross_entropy"):
        return {"liger": lambda h, w, y: lf.liger_fused_linear_cross_entropy(h * scale, w, y)}
    if case.kernel == "rotary" and hasattr(lf, "liger_rope"):
        q = case.inputs[0]
        k = torch.zeros(q.shape[0], 1, q.shape[1], q.shape[3], device=q.device, dtype=q.dtype)  # one kv head

        def rope(q, c, s):  # Liger wants [batch, heads, seq, head_dim] and full-width cos/sin
            cos, sin = torch.cat((c, c), -1)[None].to(q.dtype), torch.cat((s, s), -1)[None].to(q.dtype)
            return lf.liger_rope(q.transpose(1, 2), k, cos, sin)[0]
        return {"liger": rope}
    return {}


# -- timing -----------------------------------------------------------------------------------------
def time_ms(step, grads, env: Env) -> float:
    if env.cuda:
        import triton.testing

        return float(triton.testing.do_bench(step, warmup=WARMUP_MS, rep=REP_MS, grad_to_none=grads,
                                             return_mode="median"))
    return median_ms(step, env)


def measure(case: bk.Case, impls: Dict[str, Callable], pass_name: str, env: Env) -> Dict[str, dict]:
    """impl -> {"ms", "peak_mb"} or {"error"} for one pass."""
    out = {}
    for impl, fn in impls.items():
        try:
            step, grads = bk.make_step(fn, case, backward=pass_name == "fwd+bwd")  # one call: JIT, compile
            ms = time_ms(step, grads, env)
            peak = bk.peak_bytes(step, grads) / bk.MiB if env.cuda else None
            out[impl] = {"ms": ms, "peak_mb": peak}
            del step, grads
        except Exception as exc:  # noqa: BLE001 - recorded, the next impl still runs
            env.log(f"{case.kernel} {pass_name} {impl}: {traceback.format_exc()}")
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            out[impl] = {"error": f"{type(exc).__name__}: {first}"}
    return out


def flops(case: bk.Case, pass_name: str) -> Optional[float]:
    if case.kernel != "fused_linear_cross_entropy":
        return None
    hidden, weight, _ = case.inputs
    mnk = 2.0 * hidden.shape[0] * hidden.shape[1] * weight.shape[0]
    return mnk if pass_name == "fwd" else 3 * mnk  # logits; + the two gradient products


# -- rows -------------------------------------------------------------------------------------------
def case_rows(case: bk.Case, shape: bk.Shape, tokens: int, env: Env, csv_rows: List[dict],
              compile_ok: bool = True) -> List[Row]:
    rows: List[Row] = []
    label = f"{case.kernel} {{}} ({shape.name}, {tokens} tokens, bf16)"
    eager = {k: v for k, v in case.impls.items() if k != "triton"}
    impls = dict(case.impls)
    compiled_note = ""
    if env.rehearsal:
        compiled_note = "torch.compile skipped on the CPU rehearsal (slow there)"
    elif not compile_ok:
        compiled_note = f"torch.compile skipped: past {COMPILE_UNTIL_S} s of the section's time"
    else:
        try:
            base_name, base_fn = next(iter(eager.items()))
            impls["compiled"] = torch.compile(base_fn)
            compiled_note = f"torch.compile of {base_name}"
        except Exception as exc:  # noqa: BLE001
            compiled_note = f"torch.compile unavailable: {type(exc).__name__}: {exc}"[:200]
    impls.update(liger_impls(case, shape))
    copy_gbps = env.ceilings.get("copy_gbps") if env.ceilings else None
    matmul_tflops = env.ceilings.get("matmul_bf16_tflops") if env.ceilings else None
    gated = env.cuda and not env.rehearsal
    for pass_name, floor in case.floor_bytes.items():
        name = label.format(pass_name)
        res = measure(case, impls, pass_name, env)
        tri = res["triton"]
        for impl, r in res.items():
            ms = r.get("ms")
            csv_rows.append({"kernel": case.kernel, "shape": shape.name, "tokens": tokens, "dtype": "bfloat16",
                             "pass": pass_name, "impl": impl, "median_ms": bk.sig(ms) if ms else None,
                             "floor_bytes": floor, "gbps": bk.sig(floor / (ms * 1e-3) / 1e9) if ms else None,
                             "triton_speedup": bk.sig(ms / tri["ms"]) if ms and "ms" in tri else None,
                             "peak_mem_mb": bk.sig(r["peak_mb"]) if r.get("peak_mb") is not None else None,
                             "error": r.get("error", "")})
        if "error" in tri:
            rows.append(Row(f"{name}: triton", False, None, "ms", "runs", tri["error"]))
            continue
        ms = tri["ms"]
        gbps = floor / (ms * 1e-3) / 1e9
        rows.append(Row(f"{name}: triton median", None, ms, "ms", "",
                        f"{gbps:.4g} GB/s over a {floor / 1e6:.4g} MB floor"))
        frac_name = f"{name}: GB/s / copy ceiling"
        if not copy_gbps:
            rows.append(Row(frac_name, None, None, "x", "", f"{gbps:.4g} GB/s; no copy ceiling measured"))
        elif gated and case.kernel in MEMORY_BOUND:
            rows.append(check(frac_name, gbps / copy_gbps, BANDWIDTH_TARGET, "x copy",
                              f"{gbps:.4g} of {copy_gbps:.4g} GB/s", at_least=True))
        else:
            why = "no GPU: a rehearsal figure" if not gated else "compute-bound: not held to the copy ceiling"
            rows.append(Row(frac_name, None, gbps / copy_gbps, "x copy", "", f"{gbps:.4g} GB/s; {why}"))
        fl = flops(case, pass_name)
        if fl:
            tflops = fl / (ms * 1e-3) / 1e12
            rows.append(Row(f"{name}: useful TFLOP/s / matmul ceiling", None,
                            tflops / matmul_tflops if matmul_tflops else None, "x matmul", "",
                            f"{tflops:.4g} TFLOP/s" + (f" of {matmul_tflops:.4g}" if matmul_tflops else
                                                       "; no matmul ceiling measured")))
        for impl, r in res.items():
            if impl == "triton":
                continue
            what = {"compiled": compiled_note, "liger": "Liger-Kernel"}.get(impl, f"eager PyTorch ({impl})")
            row_name = f"{name}: speedup vs {impl}"
            if "error" in r:
                rows.append(Row(row_name, None, None, "x", "", f"{what} failed: {r['error']}"))
            elif impl == "liger" and gated:
                rows.append(check(row_name, r["ms"] / ms, LIGER_TARGET, "x", f"{what}: {r['ms']:.4g} ms",
                                  at_least=True))
            else:
                rows.append(Row(row_name, None, r["ms"] / ms, "x", "", f"{what}: {r['ms']:.4g} ms"))
        if "compiled" not in impls:
            rows.append(Row(f"{name}: speedup vs compiled", None, None, "x", "", compiled_note))
        if case.kernel == "fused_linear_cross_entropy":
            rows += memory_rows(name, res, gated, env)
    return rows


def memory_rows(name: str, res: Dict[str, dict], gated: bool, env: Env) -> List[Row]:
    if not env.cuda:
        return [Row(f"{name}: peak memory", None, None, "MiB", "", "CUDA only (max_memory_allocated)")]
    rows = [Row(f"{name}: peak memory above inputs, {impl}", None, r["peak_mb"], "MiB", "", "")
            for impl, r in res.items() if r.get("peak_mb") is not None]
    tri = res["triton"]
    against = {"eager-materialised": "materialised logits", "eager-chunked": "torch chunked"}
    for impl, what in against.items():
        r = res.get(impl)
        if r is None:
            rows.append(Row(f"{name}: vs {what}", None, None, "", "", "this torch lacks it"))
            continue
        if "error" in r:
            continue
        bound = 0.30 if impl == "eager-materialised" else 1.00
        peak = check(f"{name}: peak vs {what}", tri["peak_mb"] / max(r["peak_mb"], 1e-9), bound, "x",
                     f"{tri['peak_mb']:.4g} vs {r['peak_mb']:.4g} MiB")
        rows.append(peak if gated else Row(peak.name, None, peak.value, "x", "", peak.detail))
        if impl == "eager-chunked":
            t = check(f"{name}: time vs {what}", tri["ms"] / r["ms"], 1.00, "x",
                      f"{tri['ms']:.4g} vs {r['ms']:.4g} ms")
            rows.append(t if gated else Row(t.name, None, t.value, "x", "", t.detail))
    return rows


def run(env: Env) -> List[Row]:
    shape, tokens = (GPU_SHAPE, GPU_TOKENS) if env.cuda else (TINY_SHAPE, TINY_TOKENS)
    gen = torch.Generator(device=env.device).manual_seed(0)
    rows: List[Row] = []
    csv_rows: List[dict] = []
    try:
        import liger_kernel  # noqa: F401

        rows.append(Row("Liger-Kernel", None, None, "", "", f"installed {getattr(liger_kernel, '__version__', '')}"))
    except Exception:  # noqa: BLE001
        rows.append(Row("Liger-Kernel", None, None, "", "", "not installed: no comparison"))
    section_start = time.monotonic()
    for build in bk.CASES:
        start = time.monotonic()
        kernel = build.__name__.removesuffix("_case")
        name = f"{kernel} ({shape.name}, {tokens} tokens, bf16)"
        if start - section_start > STOP_AFTER_S:
            rows.append(Row(name, None, None, "", "", f"not measured: past {STOP_AFTER_S} s of the section's time"))
            continue
        try:
            case = build(shape, tokens, env.device, torch.bfloat16, gen)
            rows += case_rows(case, shape, tokens, env, csv_rows,
                              compile_ok=start - section_start < COMPILE_UNTIL_S)
            del case
        except Exception as exc:  # noqa: BLE001 - one kernel's failure is a row, not a crashed section
            env.log(traceback.format_exc())
            rows.append(Row(name, False, None, "", "runs", f"{type(exc).__name__}: {exc}"[:300]))
        if env.cuda:
            torch.cuda.empty_cache()
        env.log(f"{kernel}: {time.monotonic() - start:.1f} s")
        # after each case, so that a section stopped at its time limit still leaves its figures
        write_json(env.out_dir / "benchmarks.json", {"shape": shape.name, "tokens": tokens, "impls": csv_rows})
    if csv_rows:
        bk.write_csv(csv_rows, str(env.out_dir / "benchmarks.csv"))
    return rows
