"""Training through `megacpm train` itself: tokens/s, MFU, peak memory against `megacpm info`,
recomputation on and off, compiled blocks (train.compile) against eager, and a checkpoint resumed on
the device with the same next losses.

On a GPU: MiniCPM-1.2B in bf16 at seq 4096 (micro-batch 2, global batch 8: four micro-batches on
one GPU), the same with activation checkpointing, the wt-36m wind-tunnel shape, and a wt-9m run
resumed from its step-2 checkpoint in a fresh run directory. On the CPU rehearsal the same code
paths with a shrunk `tiny` model (the figures mean nothing there; the resume check is exact).

The data is a Megatron indexed dataset of random token ids written here (throughput needs no
tokenizer). Each run is a `python -m megacpm train` subprocess (its output in OUT/<name>.log) whose
RUN/metrics.jsonl is read back; a failing run is a failing row with its stderr tail.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from gpucheck.common import REPO, Env, Row, check, datasheet_bf16_tflops

WARMUP_STEPS = 3  # logged steps left out of the tokens/s median (compilation, allocator growth)
SECTION_BUDGET_S = 185.0  # gpu_check.py stops the section at 200 s: later runs are skipped past this
MEMORY_RATIO_RANGE = (0.5, 1.5)  # measured peak / `megacpm info` estimate
MFU_TARGET = 0.5  # against the datasheet bf16 peak, the main 1.2B run only

COMMON = ["--train.eval_batches=0", "--train.log_interval=1", "--log.tensorboard=false", "--log.progress=false"]
RESUME = ["--train.steps=4", "--checkpoint.interval=2", "--checkpoint.keep=0", "--schedule.kind=constant",
          "--schedule.warmup_steps=0"]
# The rehearsal's model: `tiny` shrunk to seconds per run on two CPU cores.
SHRUNK = ["--model.hidden_size=64", "--model.intermediate_size=128", "--model.num_hidden_layers=2",
          "--model.num_attention_heads=2", "--model.num_key_value_heads=2", "--model.vocab_size=512",
          "--model.dim_model_base=64", "--train.seq_len=32", "--train.micro_batch_size=2",
          "--train.global_batch_size=4", "--train.device=cpu"]


class Section:
    def __init__(self, env: Env):
        self.env = env
        self.start = time.monotonic()
        self.device_name = __import__("torch").cuda.get_device_name(env.device) if env.cuda else "cpu"

    def left_s(self) -> float:
        return SECTION_BUDGET_S - (time.monotonic() - self.start)

    def subprocess_env(self) -> Dict[str, str]:
        penv = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        # gpu_check.py sets TRITON_INTERPRET=1 for the rehearsal's kernel sections; under it the model
        # would run its Triton kernels interpreted on the CPU (minutes per step): training runs torch's.
        penv.pop("TRITON_INTERPRET", None)
        if self.env.rehearsal:
            penv["OMP_NUM_THREADS"] = "2"
        return penv

    def train(self, name: str, config: str, overrides: List[str], run_dir: Optional[Path] = None) -> Dict:
        """One `megacpm train` run: {"ok", "records" (the step records), "error", "run_dir", "seconds"}."""
        run_dir = run_dir or self.env.out_dir / name
        timeout = self.left_s()
        if timeout < 10:
            return {"ok": False, "records": [], "run_dir": run_dir, "seconds": 0.0,
                    "error": f"skipped: the section's {SECTION_BUDGET_S:.0f} s budget is spent"}
        cmd = [sys.executable, "-m", "megacpm", "train", config, f"--run.dir={run_dir}", *COMMON, *overrides]
        self.env.log(f"{name}: {' '.join(cmd[3:])}")
        start = time.monotonic()
        log_path = self.env.out_dir / f"{name}.log"
        try:
            result = subprocess.run(cmd, cwd=REPO, env=self.subprocess_env(), capture_output=True, text=True,
                                    timeout=timeout, check=False)
            ok, stdout, stderr = result.returncode == 0, result.stdout, result.stderr
            if not ok:
                stderr += f"\n[exit status {result.returncode}]"
        except subprocess.TimeoutExpired as exc:
            decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
            ok, stdout, stderr = False, decode(exc.stdout), decode(exc.stderr) + f"\n[stopped after {timeout:.0f} s]"
        seconds = time.monotonic() - start
        log_path.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n")
        self.env.log(f"{name}: {'ok' if ok else 'FAILED'} in {seconds:.1f} s")
        records = []
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "loss" in record and "step" in record:
                    records.append(record)
        error = " | ".join(stderr.strip().splitlines()[-8:])[-800:].replace("|", "/")
        return {"ok": ok, "records": records, "error": error, "run_dir": run_dir, "seconds": seconds}


def write_random_corpus(prefix: Path, vocab: int, docs: int, doc_tokens: int) -> None:
    from megacpm.data import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetWriter(prefix, vocab_size=vocab) as writer:
        for _ in range(docs):
            writer.add_sequences([rng.integers(0, vocab, doc_tokens, dtype=np.int64)])
            writer.end_document()


def steady_tokens_per_sec(records: List[Dict]) -> Optional[float]:
    steady = [r["tokens_per_sec"] for r in records if r["step"] > WARMUP_STEPS]
    steady = steady or [r["tokens_per_sec"] for r in records]
    return statistics.median(steady) if steady else None


def throughput_rows(section: Section, label: str, config: str, overrides: List[str],
                    mfu_check: bool = False, memory_check: bool = True) -> List[Row]:
    """tokens/s, achieved model TFLOP/s, MFU against the measured matmul ceiling and the datasheet
    peak, and the measured peak memory against `megacpm info`'s estimate for the same config."""
    from megacpm.cli import model_summary
    from megacpm.config import load_config

    env = section.env
    name = re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-")
    run = section.train(name, config, overrides)
    shutil.rmtree(run["run_dir"] / "checkpoints", ignore_errors=True)  # the final save: GBs we do not need
    if not run["ok"] or not run["records"]:
        return [Row(f"{label}: megacpm train", False, target="exit 0 with step records", detail=run["error"])]
    summary = model_summary(load_config(config, overrides), 1)
    tps = steady_tokens_per_sec(run["records"])
    steps = len(run["records"])
    rows = [Row(f"{label}: tokens/s (median of steps {WARMUP_STEPS + 1}-{steps})", None, tps, "tok/s",
                detail=f"run {run['seconds']:.0f} s, incl. start-up, init and the final checkpoint")]
    achieved = summary["flops_per_token"] * tps / 1e12
    rows.append(Row(f"{label}: achieved model TFLOP/s", None, achieved, "TFLOP/s",
                    detail=f"{summary['flops_per_token'] / 1e9:.4g} GFLOP/token (megacpm info)"))
    ceiling = env.ceilings.get("matmul_bf16_tflops")
    if ceiling:
        rows.append(Row(f"{label}: MFU vs measured bf16 matmul ceiling", None, achieved / ceiling, "",
                        detail=f"ceiling {ceiling:.0f} TFLOP/s (ceilings section)"))
    else:
        rows.append(Row(f"{label}: MFU vs measured bf16 matmul ceiling", None, None, "",
                        detail="no measured ceiling (run the ceilings section first)"))
    peak = datasheet_bf16_tflops(section.device_name) if env.cuda else None
    if peak:
        mfu = achieved / peak
        rows.append(check(f"{label}: MFU vs datasheet bf16 peak", mfu, MFU_TARGET, at_least=True,
                          detail=f"peak {peak:.0f} TFLOP/s ({section.device_name})") if mfu_check else
                    Row(f"{label}: MFU vs datasheet bf16 peak", None, mfu, "",
                        detail=f"peak {peak:.0f} TFLOP/s ({section.device_name})"))
    elif env.cuda:
        rows.append(Row(f"{label}: MFU vs datasheet bf16 peak", None, None, "",
                        detail=f"no datasheet peak known for {section.device_name}"))
    estimate = summary["memory_per_rank_bytes"]["total"] / 2**30
    measured = max((r.get("cuda_max_allocated_gb", 0.0) for r in run["records"]), default=0.0)
    if env.cuda and measured > 0:
        ratio = measured / estimate
        lo, hi = MEMORY_RATIO_RANGE
        rows.append(Row(f"{label}: peak memory (torch max allocated)", None, measured, "GiB",
                        detail=f"`megacpm info` estimate {estimate:.2f} GiB, measured/estimate {ratio:.2f}"))
        if memory_check:
            rows.append(Row(f"{label}: peak memory / `megacpm info` estimate", lo <= ratio <= hi, ratio, "x",
                            f"{lo:g} - {hi:g}", f"measured {measured:.2f} GiB, estimate {estimate:.2f} GiB"))
    else:
        rows.append(Row(f"{label}: `megacpm info` memory estimate", None, estimate, "GiB",
                        detail="no measured peak: cuda_max_allocated_gb is CUDA only"))
    return rows


def compiled_rows(section: Section, label: str, config: str, overrides: List[str],
                  eager_rows: List[Row]) -> List[Row]:
    """The run of ``eager_rows`` again with train.compile: its throughput rows, the compiled / eager
    tokens/s ratio, and whether any graph recompiled after the first step."""
    rows = throughput_rows(section, f"{label}, train.compile", config, [*overrides, "--train.compile=true"])
    eager = next((r.value for r in eager_rows if "tokens/s" in r.name and r.value), None)
    compiled = next((r.value for r in rows if "tokens/s" in r.name and r.value), None)
    if eager and compiled:
        rows.append(Row(f"{label}: compiled / eager tokens/s", None, compiled / eager, "x"))
    log = section.env.out_dir / f"{re.sub(r'[^a-z0-9.]+', '-', f'{label}, train.compile'.lower()).strip('-')}.log"
    if log.is_file():
        text = log.read_text()
        rows.append(Row(f"{label}, train.compile: no recompilation after the first step", "recompiled" not in text,
                        detail=next((line for line in text.splitlines() if "compiled the decoder blocks" in line), "")))
    return rows


def resume_rows(section: Section, config: str, overrides: List[str]) -> List[Row]:
    """4 steps saving at 2 and 4; a fresh run directory holding only step_2 (as `latest`) continues
    to step 4: its step-3 and step-4 losses against the original's."""
    env = section.env
    label = f"checkpoint resume ({config}, {'cuda' if env.cuda else 'cpu'})"
    first = section.train("resume-original", config, [*overrides, *RESUME])
    if not first["ok"]:
        return [Row(f"{label}: original run", False, target="exit 0", detail=first["error"])]
    step_2 = first["run_dir"] / "checkpoints" / "step_2"
    if not step_2.is_dir():
        return [Row(f"{label}: original run saved step_2", False, detail=f"{step_2} missing")]
    resumed_dir = env.out_dir / "resume-continued"
    shutil.rmtree(resumed_dir, ignore_errors=True)
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(step_2, resumed_dir / "checkpoints" / "step_2")
    (resumed_dir / "checkpoints" / "latest").write_text("step_2")
    second = section.train("resume-continued", config, [*overrides, *RESUME], run_dir=resumed_dir)
    if not second["ok"]:
        return [Row(f"{label}: resumed run", False, target="exit 0", detail=second["error"])]
    want = {r["step"]: r["loss"] for r in first["records"] if r["step"] > 2}
    got = {r["step"]: r["loss"] for r in second["records"] if r["step"] > 2}
    resumed_from = min((r["step"] for r in second["records"]), default=None)
    if set(want) != {3, 4} or set(got) != {3, 4} or resumed_from != 3:
        return [Row(f"{label}: steps 3-4 logged, resumed at step 3", False,
                    detail=f"original {want}, resumed {got} (first resumed step {resumed_from})")]
    diff = max(abs(got[s] - want[s]) / max(abs(want[s]), 1e-12) for s in want)
    bound = 1e-3 if env.cuda else 0.0  # CUDA kernels need not be bitwise deterministic; the CPU is
    detail = ", ".join(f"step {s}: {want[s]:.6f} -> {got[s]:.6f}" for s in sorted(want))
    return [check(f"{label}: max relative loss difference, steps 3-4", diff, bound, detail=detail)]


def run(env: Env) -> List[Row]:
    section = Section(env)
    data_dir = env.out_dir / "data"
    if env.rehearsal:
        corpus = data_dir / "random-512"
        write_random_corpus(corpus, 512, docs=60, doc_tokens=300)
        base = ["tiny", [*SHRUNK, "--data.source=megatron", f"--data.path={corpus}"]]
        steps = ["--train.steps=5"]
        rows = throughput_rows(section, "shrunk tiny (rehearsal)", base[0],
                               [*base[1], *steps, "--train.activation_checkpointing=false"])
        rows += compiled_rows(section, "shrunk tiny (rehearsal)", base[0],
                              [*base[1], *steps, "--train.activation_checkpointing=false"], rows)
        rows += throughput_rows(section, "shrunk tiny, recompute (rehearsal)", base[0],
                                [*base[1], *steps, "--train.activation_checkpointing=true"])
        rows += resume_rows(section, base[0], base[1])
        rows.append(Row("training section time", None, time.monotonic() - section.start, "s"))
        return rows

    from megacpm.config import load_config

    big_vocab = load_config("minicpm-1.2b").model.vocab_size
    wt_vocab = load_config("wt-36m").model.vocab_size
    big_corpus, wt_corpus = data_dir / f"random-{big_vocab}", data_dir / f"random-{wt_vocab}"
    write_random_corpus(big_corpus, big_vocab, docs=200, doc_tokens=4096)  # 819k tokens; 8 steps read 262k
    write_random_corpus(wt_corpus, wt_vocab, docs=200, doc_tokens=4096)
    big = ["--data.source=megatron", f"--data.path={big_corpus}", "--train.precision=bf16", "--train.seq_len=4096",
           "--train.micro_batch_size=2", "--train.global_batch_size=8", "--train.steps=8",
           "--checkpoint.interval=1000"]
    wt = ["--data.source=megatron", f"--data.path={wt_corpus}", "--train.precision=bf16"]
    # The cheap runs before the second 1.2B one, so that a slow host spends the budget on the least
    # important run.
    # The preset recomputes by default: the main run turns it off, the second one on.
    rows = throughput_rows(section, "MiniCPM-1.2B bf16 seq 4096", "minicpm-1.2b",
                           [*big, "--train.activation_checkpointing=false"], mfu_check=True)
    rows += compiled_rows(section, "MiniCPM-1.2B bf16 seq 4096", "minicpm-1.2b",
                          [*big, "--train.activation_checkpointing=false"], rows)
    rows += resume_rows(section, "wt-9m", wt)
    rows += throughput_rows(section, "wt-36m bf16 seq 512", "wt-36m",
                            [*wt, "--train.steps=8", "--checkpoint.interval=1000"], memory_check=False)
    rows += throughput_rows(section, "MiniCPM-1.2B bf16 seq 4096, recompute", "minicpm-1.2b",
                            [*big, "--train.activation_checkpointing=true"])
    rows.append(Row("training section time", None, time.monotonic() - section.start, "s",
                    target=f"< {SECTION_BUDGET_S:.0f}"))
    return rows
