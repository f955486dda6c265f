"""Supervised fine-tuning: the mean cross entropy over the completion tokens of the step.

The chat data already carry the rule of which tokens are learned (labels are IGNORE_INDEX on
prompts, system text and padding; megacpm.data.chat), so SFT is language modelling over those
labels: the summed loss over every rank and micro-batch divided by the global count of loss
tokens (TRL's num_items_in_batch), never a mean of per-micro-batch means.
"""
from megacpm.objectives.lm import LanguageModelling


class SupervisedFineTuning(LanguageModelling):
    kind = "sft"
