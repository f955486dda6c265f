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


def build_objective(cfg: Optional[ObjectiveConfig] = None) -> Objective:
    """The objective of ``cfg.kind`` (default: language modelling) with its fields."""
    cfg = cfg or ObjectiveConfig()
    if cfg.kind not in OBJECTIVES:
        raise ValueError(f"objective.kind: must be one of {', '.join(OBJECTIVES)}, got {cfg.kind!r}")
    if cfg.kind == "dpo":
        return DirectPreferenceOptimization(cfg.beta, cfg.loss, cfg.label_smoothing)
    return OBJECTIVES[cfg.kind]()


__all__ = ["OBJECTIVES", "DirectPreferenceOptimization", "LanguageModelling", "Objective",
           "SupervisedFineTuning", "build_objective"]
