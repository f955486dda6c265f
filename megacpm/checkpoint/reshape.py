"""The model-shape changes a branch may make: the long-context recipe's (MiniCPM-2.4B-128K).

- Untying (``model.tie_word_embeddings`` true -> false): the new LM head is an exact copy of the
  input embedding, so the logits at the branch step are those of the parent, bit for bit. Its AdamW
  moments start at zero (a fresh state for a new tensor; the embedding keeps its own). It trains
  under the embedding's muP rule (megacpm.optim.optimizer: the group the tied weight trained in), so
  the head's learning rate does not jump at the branch either.
- Growing the vocabulary (``model.vocab_size`` larger): the new rows of the embedding (and of an
  untied head) are the mean of the existing rows (the rule of Hugging Face's
  ``resize_token_embeddings``: a new token starts as an average token, not as noise of a
  different scale), their moments zero. The existing rows are untouched, so the logits of the old
  vocabulary are unchanged; the new tokens add logits of their own.
Both at once: the vocabulary grows first, then the head copies the grown embedding. The opposite
changes (re-tying, which would throw the head away, and shrinking the vocabulary) are refused.

Everything else about the branch (the RoPE base and scaling, the sequence length, the data) needs
no change to the weights: RoPE holds no parameters.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict

import torch

from megacpm.checkpoint.catalog import CheckpointError
from megacpm.config import ModelConfig

RESHAPE_FIELDS = frozenset({"tie_word_embeddings", "vocab_size"})
EMBEDDING, HEAD = "embed_tokens.weight", "lm_head.weight"


def check_reshape(saved: Dict, new: Dict, spelling: Callable[[str], str], checkpoint) -> bool:
    """Whether the branch from a checkpoint of model shape ``saved`` to ``new`` (model config
    mappings) changes the vocabulary or the tying, refusing the changes that cannot be made."""
    old_tied, new_tied = bool(saved["tie_word_embeddings"]), bool(new.get("tie_word_embeddings", saved["tie_word_embeddings"]))
    old_vocab, new_vocab = int(saved["vocab_size"]), int(new.get("vocab_size", saved["vocab_size"]))
    if new_tied and not old_tied:
        raise CheckpointError(f"{spelling('tie_word_embeddings')}: the checkpoint {checkpoint} has an untied LM head; "
                              f"tying it again would discard the head's weights (a branch may untie, not re-tie)")
    if new_vocab < old_vocab:
        raise CheckpointError(f"{spelling('vocab_size')}: the checkpoint {checkpoint} has model.vocab_size = "
                              f"{old_vocab}, the branch asks for {new_vocab}; a branch may grow the vocabulary, "
                              f"never shrink it (the trained rows would be lost)")
    return new_tied != old_tied or new_vocab != old_vocab


def parent_model(new: ModelConfig, saved: Dict) -> ModelConfig:
    """The parent's model config: ``new`` with the checkpoint's vocabulary and tying."""
    parent = copy.deepcopy(new)
    parent.vocab_size, parent.tie_word_embeddings = int(saved["vocab_size"]), bool(saved["tie_word_embeddings"])
    return parent


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([weight, weight.mean(dim=0, keepdim=True).expand(rows, -1)])


def _zero_rows(moment: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([moment, moment.new_zeros(rows, moment.shape[1])])


def reshaped_state(state: Dict[str, Dict], parent: ModelConfig, new: ModelConfig) -> Dict[str, Dict]:
    """The model-space state ({"model": weights, "optim": {moment: tensors}, ...}) of ``parent``'s
    checkpoint in ``new``'s shape (see the module docstring); other entries pass through."""
    weights = dict(state["model"])
    moments = {key: dict(values) for key, values in state["optim"].items()}
    extra_rows = new.vocab_size - parent.vocab_size
    if extra_rows:
        for name in (EMBEDDING, HEAD):
            if name in weights:
                weights[name] = _grow_rows(weights[name], extra_rows)
                for values in moments.values():
                    values[name] = _zero_rows(values[name], extra_rows)
    if parent.tie_word_embeddings and not new.tie_word_embeddings:
        weights[HEAD] = weights[EMBEDDING].clone()
        for values in moments.values():
            values[HEAD] = torch.zeros_like(weights[HEAD])
    return {**state, "model": weights, "optim": moments}
