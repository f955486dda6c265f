"""What happens around each training step besides the step itself: the reporting sinks
(metrics.jsonl, TensorBoard, the console, W&B), the GPU monitor, communication accounting,
evaluation, checkpoints and stopping, the profiler, train.compile's compilations. Each is a Callback
(megacpm.train.callbacks.base) in its own module; the trainer builds the list and calls the hooks in
order.
"""
from megacpm.train.callbacks.base import Callback, CallbackList, Record, Sink, is_log_step
from megacpm.train.callbacks.checkpointing import Checkpointing, StopRequest
from megacpm.train.callbacks.comm import CommStats
from megacpm.train.callbacks.compile_monitor import CompileMonitor
from megacpm.train.callbacks.console import Console
from megacpm.train.callbacks.evaluation import Evaluation, is_eval_step
from megacpm.train.callbacks.gpu import GpuMonitor
from megacpm.train.callbacks.metrics_file import MetricsFile
from megacpm.train.callbacks.profiler import Profiler, trace_path
from megacpm.train.callbacks.records import StepRecords
from megacpm.train.callbacks.tensorboard import TensorBoard
from megacpm.train.callbacks.wandb_logger import WandB, import_wandb

__all__ = ["Callback", "CallbackList", "Checkpointing", "CommStats", "CompileMonitor", "Console", "Evaluation",
           "GpuMonitor", "MetricsFile", "Profiler", "Record", "Sink", "StepRecords", "StopRequest", "TensorBoard", "WandB",
           "import_wandb", "is_eval_step", "is_log_step", "trace_path"]
