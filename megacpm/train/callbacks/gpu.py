"""GPU memory and utilisation on logged steps: torch's own peak always on CUDA, NVML's (log.nvml)
when nvidia-ml-py and a driver are there."""
from __future__ import annotations

from megacpm.train.callbacks.base import Callback, Record


class GpuMonitor(Callback):
    """cuda_max_allocated_gb (torch.cuda.max_memory_allocated: the peak of tensor memory so far) and,
    from NVML (nvidia-ml-py), gpu_mem_used_gb and gpu_util of the run's device, added to the record
    of each logged step; the NVML fields are absent silently without the package or a driver."""

    def __init__(self, device_index: int, use_nvml: bool = True):
        self.device_index = device_index
        self._handle = None
        if not use_nvml:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self._nvml = pynvml
        except Exception:  # no package, no driver, no GPU: monitoring is optional by design
            self._handle = None

    def sample(self) -> Record:
        import torch

        record: Record = {"cuda_max_allocated_gb": torch.cuda.max_memory_allocated(self.device_index) / 2**30}
        if self._handle is None:
            return record
        mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
        return {**record, "gpu_mem_used_gb": mem.used / 2**30, "gpu_util": float(util.gpu)}

    def record_fields(self, trainer, step) -> Record:
        return self.sample()
