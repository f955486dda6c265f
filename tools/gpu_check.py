#!/usr/bin/env python
"""The GPU proof: one command that checks and measures megacpm's CUDA path on a lent GPU.

  python tools/gpu_check.py OUT_DIR                  # on a CUDA machine (the device tool's $OUT)
  python tools/gpu_check.py OUT_DIR --cpu-rehearsal  # the same steps at tiny sizes on the CPU
  python tools/gpu_check.py OUT_DIR --only kernels benchmarks

Steps, each a section in its own process (a CUDA fault in one cannot poison the others), each with
a time limit so the whole run stays under about 9 minutes on one H100/H200:
  install     megacpm into this Python without touching its torch (pip --no-deps
              --no-build-isolation: the C++ extension is built here); GPU only
  environment device, driver, CUDA, torch, Triton, Python (no device time)
  ceilings    the measured copy bandwidth and bf16 matmul rate (tools/gpucheck/ceilings.py)
  kernels     every Triton kernel compiled, forward and backward, fp32 and bf16, realistic shapes,
              against fp64 references with poisoned outputs (tools/gpucheck/kernels.py)
  benchmarks  kernel medians (CUDA events), GB/s against each byte floor and the copy ceiling,
              speedups against eager and torch.compile (and Liger-Kernel when installed), the fused
              linear cross entropy's memory and time (tools/gpucheck/benchmarks.py)
  training    `megacpm train` itself in bf16: tokens/s, MFU, peak memory against `megacpm info`,
              recomputation on and off, a checkpoint resumed on CUDA (tools/gpucheck/training.py)
  tests       the suite's CUDA-marked tests (pytest -m cuda)

It writes OUT_DIR/results.json (every row of every section), OUT_DIR/report.md (the same as
Markdown, the body of docs/gpu-report.md) and each section's files under OUT_DIR/<section>/, and
prints a short table last. It never changes the card's settings. The exit status is 1 when a check
failed or a section crashed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
SECTIONS = ("ceilings", "kernels", "benchmarks", "training", "tests")
# Seconds each section may take on a GPU (the rehearsal gets the same limits).
TIME_LIMITS = {"install": 120, "ceilings": 40, "kernels": 120, "benchmarks": 150, "training": 200, "tests": 90}


def _prepare_imports(rehearsal: bool) -> None:
    if rehearsal:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, or the decorators ignore it
    for path in (str(TOOLS), str(REPO)):
        if path not in sys.path:
            sys.path.insert(0, path)


# -- one section, in this process ------------------------------------------------------------------
def run_section(name: str, out_dir: Path, rehearsal: bool) -> int:
    _prepare_imports(rehearsal)
    import torch

    from gpucheck.common import Env, rows_to_json, write_json

    section_dir = out_dir / name
    section_dir.mkdir(parents=True, exist_ok=True)
    ceilings_path = out_dir / "ceilings.json"
    ceilings = json.loads(ceilings_path.read_text()) if ceilings_path.is_file() else {}
    device = torch.device("cuda", 0) if (torch.cuda.is_available() and not rehearsal) else torch.device("cpu")
    env = Env(rehearsal=rehearsal, device=device, out_dir=section_dir, ceilings=ceilings,
              log=lambda text: print(f"[{name}] {text}", flush=True))
    start = time.monotonic()
    rows, error = [], None
    try:
        module = importlib.import_module(f"gpucheck.{name}")
        rows = module.run(env)
    except Exception:  # recorded, and the other sections still run
        error = traceback.format_exc()
        print(error, file=sys.stderr, flush=True)
    write_json(section_dir / "result.json", {"section": name, "rows": rows_to_json(rows), "error": error,
                                          "seconds": time.monotonic() - start})
    if name == "ceilings" and error is None:
        values = {r.unit: r.value for r in rows}
        write_json(ceilings_path, {"copy_gbps": values.get("GB/s"), "matmul_bf16_tflops": values.get("TFLOP/s")})
    return 0 if error is None else 1


# -- the driver ------------------------------------------------------------------------------------
def install(log) -> Dict:
    """megacpm into this interpreter, its dependencies left alone (the device's own torch stays)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(REPO)]
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIME_LIMITS["install"], check=False)
    log(f"install: exit {result.returncode} in {time.monotonic() - start:.0f} s")
    ok = result.returncode == 0
    return {"section": "install", "rows": [{"name": "pip install --no-deps --no-build-isolation -e .", "ok": ok,
                                             "value": None, "unit": "", "target": "exit 0",
                                             "detail": "" if ok else result.stderr[-2000:]}],
            "error": None if ok else result.stderr[-4000:], "seconds": time.monotonic() - start}


def environment(rehearsal: bool) -> Dict[str, str]:
    _prepare_imports(rehearsal)
    import torch

    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
            "torch": torch.__version__, "cuda (torch)": str(torch.version.cuda), "mode": "cpu rehearsal" if rehearsal
            else "gpu"}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "missing"
    if torch.cuda.is_available() and not rehearsal:
        info["device"] = torch.cuda.get_device_name(0)
        info["compute capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info["memory"] = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB"
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["driver, sm clock, max sm clock, power limit"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = "nvidia-smi unavailable"
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores)"
    return info


def _spawn(name: str, out_dir: Path, rehearsal: bool, log) -> Dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), str(out_dir), "--section", name]
    if rehearsal:
        cmd.append("--cpu-rehearsal")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TOOLS), os.environ.get("PYTHONPATH", "")]))
    start = time.monotonic()
    log_path = out_dir / f"{name}.log"
    (out_dir / name / "result.json").unlink(missing_ok=True)  # a stale result must not stand for this run
    try:
        with open(log_path, "w") as log_file:
            subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, timeout=TIME_LIMITS[name],
                           check=False)
    except subprocess.TimeoutExpired:
        log(f"{name}: stopped at its {TIME_LIMITS[name]} s limit")
    result_path = out_dir / name / "result.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        tail = log_path.read_text()[-4000:] if log_path.is_file() else ""
        result = {"section": name, "rows": [], "error": f"no result (crashed or timed out); log tail:\n{tail}"}
    result["seconds"] = time.monotonic() - start
    log(f"{name}: {len(result['rows'])} rows, {'error' if result['error'] else 'ok'}, {result['seconds']:.0f} s")
    return result


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _status(row: Dict) -> str:
    return {True: "pass", False: "FAIL", None: ""}[row["ok"]]


def report_markdown(info: Dict[str, str], results: List[Dict]) -> str:
    lines = ["# megacpm GPU report", "", "Written by `python tools/gpu_check.py OUT_DIR`"
             + (" --cpu-rehearsal (a CPU rehearsal: no figure here is a GPU figure)" if info["mode"] != "gpu" else "")
             + ".", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    for result in results:
        lines += ["", f"## {result['section']} ({result.get('seconds', 0):.0f} s)", ""]
        if result["error"]:
            lines += ["Section error:", "", "```", result["error"].strip()[-3000:], "```", ""]
        if result["rows"]:
            lines += ["| check | status | value | unit | target | detail |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['name']} | {_status(r)} | {_fmt(r['value'])} | {r['unit']} | {r['target']} | "
                      f"{r['detail']} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def summary_table(results: List[Dict]) -> str:
    """The short table printed last: per section, checks passed / failed, and its error if any."""
    lines = [f"{'section':<12} {'pass':>5} {'fail':>5} {'rows':>5} {'s':>5}  note"]
    for result in results:
        rows = result["rows"]
        passed = sum(1 for r in rows if r["ok"] is True)
        failed = [r for r in rows if r["ok"] is False]
        note = "ERROR: " + result["error"].strip().splitlines()[-1][:60] if result["error"] else (
            "failed: " + "; ".join(r["name"] for r in failed)[:80] if failed else "")
        lines.append(f"{result['section']:<12} {passed:>5} {len(failed):>5} {len(rows):>5} "
                     f"{result.get('seconds', 0):>5.0f}  {note}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="where results.json, report.md and the sections' files go")
    parser.add_argument("--cpu-rehearsal", action="store_true",
                        help="the same steps at tiny sizes on the CPU, Triton kernels interpreted")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--no-install", action="store_true", help="use the megacpm already importable")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # one section, in-process
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.section:
        return run_section(args.section, args.out_dir, args.cpu_rehearsal)

    def log(text: str) -> None:
        print(f"gpu_check: {text}", flush=True)

    results: List[Dict] = []
    if not args.cpu_rehearsal and not args.no_install:
        results.append(install(log))
    info = environment(args.cpu_rehearsal)
    log(", ".join(f"{k} {v}" for k, v in info.items()))
    for name in args.only or SECTIONS:
        results.append(_spawn(name, args.out_dir, args.cpu_rehearsal, log))
    payload = {"environment": info, "sections": results}
    (args.out_dir / "results.json").write_text(json.dumps(payload, indent=1))
    (args.out_dir / "report.md").write_text(report_markdown(info, results))
    print(summary_table(results), flush=True)
    failed = any(r["error"] or any(row["ok"] is False for row in r["rows"]) for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
