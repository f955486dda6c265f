"""What the trainer reports to: metrics.jsonl, TensorBoard, the console, GPU monitoring.

Each sink receives plain dict records (``{"step": 10, "loss": 3.2, ...}``) and is optional; the
trainer does not know how any of them writes.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional


Record = Dict[str, Any]


class MetricsFile:
    """Appends one JSON object per record to RUN/metrics.jsonl (flushed, so a crash keeps them).

    On resume, records past the resumed step are dropped first: the steps after the last checkpoint
    are recomputed, and the file must not hold them twice.
    """

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self._truncate_after(resume_step)
        self._file = open(path, "a", buffering=1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept: List[str] = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        tmp.replace(self.path)

    def write(self, record: Record) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


class TensorBoard:
    """Scalars to RUN/tb/ through torch's SummaryWriter (needs the tensorboard package)."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is heavy

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: Record) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                # Keys naming their own section (comm_bytes/tp.all_reduce) keep it.
                tag = key if "/" in key else (f"eval/{key}" if key.startswith("eval") else f"train/{key}")
                self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self._writer.close()


class Console:
    """A tqdm progress bar on a terminal; plain log lines otherwise (CI logs, redirected output)."""

    def __init__(self, total_steps: int, start_step: int, use_bar: bool):
        self._bar = None
        if use_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._start = time.monotonic()
        self._start_step = start_step
        self._total = total_steps

    def step_done(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def write(self, record: Record) -> None:
        if "eval_loss" in record:
            self.message(f"step {record['step']}: eval_loss {record['eval_loss']:.4f}")
            return
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                  tok_s=f"{record['tokens_per_sec']:.0f}", refresh=False)
            return
        step = record["step"]
        done = step - self._start_step
        elapsed = time.monotonic() - self._start
        eta = elapsed / done * (self._total - step) if done > 0 else float("nan")
        self.message(
            f"step {step}/{self._total} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
            f"grad_norm {record['grad_norm']:.3f} | {record['tokens_per_sec']:.0f} tok/s | ETA {_hms(eta)}"
        )

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class GpuMonitor:
    """GPU memory and utilisation from NVML (nvidia-ml-py); absent silently without it or a GPU."""

    def __init__(self, device_index: int):
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self._nvml = pynvml
        except Exception:  # no package, no driver, no GPU: monitoring is optional by design
            self._handle = None

    @classmethod
    def create(cls, device_index: int) -> Optional["GpuMonitor"]:
        monitor = cls(device_index)
        return monitor if monitor._handle is not None else None

    def sample(self) -> Record:
        mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
        return {"gpu_mem_used_gb": mem.used / 2**30, "gpu_util": float(util.gpu)}
