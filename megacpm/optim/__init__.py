"""Optimisation: AdamW with muP parameter groups, LR schedules, gradient clipping."""
from megacpm.optim.clip import clip_grad_norm_
from megacpm.optim.optimizer import build_optimizer, param_groups, set_lr
from megacpm.optim.schedule import LRSchedule

__all__ = ["LRSchedule", "build_optimizer", "clip_grad_norm_", "param_groups", "set_lr"]
