"""Training objectives (``objective.kind``): the loss, its normaliser and its metrics.

See megacpm.objectives.base for the contract. ``lm`` is pretraining, ``sft`` supervised
fine-tuning on chat samples, ``dpo`` direct preference optimisation.
"""
from typing import Dict, Optional, Type

from megacpm.config.schema import ObjectiveConfig
from megacpm.objectives.base import Objective
from megacpm.objectives.dpo import DirectPreferenceOptimization
from megacpm.objectives.lm import LanguageModelling
from megacpm.objectives.sft import SupervisedFineTuning

OBJECTIVES: Dict[str, Type[Objective]] = {cls.kind: cls for cls in (LanguageModelling, SupervisedFineTuning,
                                                                    DirectPreferenceOptimization)}


def build_objective(cfg: Optional[ObjectiveConfig] = None, position_buckets: int = 0, seq_len: int = 0) -> Objective:
    """The objective of ``cfg.kind`` (default: language modelling) with its fields; a token-level one
    (lm, sft) with ``position_buckets`` > 0 also reports the loss by position over ``seq_len``
    (megacpm.objectives.lm)."""
    cfg = cfg or ObjectiveConfig()
    if cfg.kind not in OBJECTIVES:
        raise ValueError(f"objective.kind: must be one of {', '.join(OBJECTIVES)}, got {cfg.kind!r}")
    if cfg.kind == "dpo":
        if position_buckets:
            raise ValueError("train.eval_position_buckets: the loss by position is a token-level metric; "
                             "objective.kind dpo has none (set it to 0)")
        return DirectPreferenceOptimization(cfg.beta, cfg.loss, cfg.label_smoothing)
    return OBJECTIVES[cfg.kind](position_buckets, seq_len)


__all__ = ["OBJECTIVES", "DirectPreferenceOptimization", "LanguageModelling", "Objective",
           "SupervisedFineTuning", "build_objective"]
