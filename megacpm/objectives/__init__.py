"""Training objectives (``objective.kind``): the loss, its normaliser and its metrics.

See megacpm.objectives.base for the contract. ``lm`` is pretraining; SFT and DPO join here.
"""
from typing import Dict, Type

from megacpm.objectives.base import Objective
from megacpm.objectives.lm import LanguageModelling

OBJECTIVES: Dict[str, Type[Objective]] = {LanguageModelling.kind: LanguageModelling}


def build_objective(kind: str = "lm") -> Objective:
    if kind not in OBJECTIVES:
        raise ValueError(f"objective.kind: must be one of {', '.join(OBJECTIVES)}, got {kind!r}")
    return OBJECTIVES[kind]()


__all__ = ["OBJECTIVES", "LanguageModelling", "Objective", "build_objective"]
