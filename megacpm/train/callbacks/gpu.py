"""GPU memory and utilisation on logged steps (NVML, log.nvml)."""
from __future__ import annotations

from typing import Optional

from megacpm.train.callbacks.base import Callback, Record


class GpuMonitor(Callback):
    """gpu_mem_used_gb and gpu_util of the run's device from NVML (nvidia-ml-py), added to the record of
    each logged step; absent silently without the package, a driver or a GPU."""

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

    def record_fields(self, trainer, step) -> Record:
        return self.sample()
