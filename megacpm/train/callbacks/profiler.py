"""torch.profiler traces of chosen steps (log.profile_steps), every rank, under RUN/profile/."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable

import torch

from megacpm.train.callbacks.base import Callback


def trace_path(profile_dir: Path, rank: int, step: int) -> Path:
    """RUN/profile/rank<R>_step<S>.pt.trace.json: a Chrome trace (Perfetto, chrome://tracing, or
    TensorBoard's profiler plugin, which reads the *.pt.trace.json files of a directory)."""
    return Path(profile_dir) / f"rank{rank}_step{step}.pt.trace.json"


class Profiler(Callback):
    """Profiles ``train_step`` of each chosen step (CPU, and CUDA on a GPU run, with shapes) and writes
    one trace per rank and step. Steps outside this run's range (before a resumed step, past
    train.steps) are not profiled. The profiled steps run slower: their tokens_per_sec shows it."""

    def __init__(self, profile_dir: Path, steps: Iterable[int]):
        self.profile_dir = Path(profile_dir)
        self.steps = set(int(s) for s in steps)

    def step_context(self, trainer, step):
        if step not in self.steps:
            return contextlib.nullcontext()
        return self._profile(trainer, step)

    @contextlib.contextmanager
    def _profile(self, trainer, step):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if trainer.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            with torch.profiler.record_function(f"train_step {step}"):
                yield
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_path(self.profile_dir, trainer.ctx.rank, step)))
