"""The multi-process test harness: megacpm.parallel.local_launch.run_distributed."""
from megacpm.parallel.local_launch import free_port, run_distributed

__all__ = ["free_port", "run_distributed"]
