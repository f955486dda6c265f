"""ParamSpec: the one declared description of how a parameter is split, reduced and counted.

Every parameter of a sharded model carries exactly one frozen ParamSpec, attached by
``set_param_spec`` and read by ``param_spec`` (an unannotated parameter is an error, not a silent
default); the gradient buffers, the gradient-norm count, clipping, checkpoints and ``megacpm info``
all read it, so a new module type declares its parameters once, in its sharding plan.

Fields:
- ``shard_dims``: {axis: tensor dim} for each parallel axis the parameter is split over (a
  column-parallel weight: {"tp": 0}; row-parallel: {"tp": 1}). Axes not named hold full copies.
- ``padded_rows``: (global rows, this rank's real rows) when the split of dim 0 is padded (a
  vocabulary tp does not divide): the rows past the real ones are padding, never model space.
- ``partial_over``: process-group kinds over which each rank's gradient is only a partial sum,
  completed by an all-reduce before clipping (an SP norm gain over "tp"; the two copies of a tied
  embedding over "embedding").
- ``reduced_over``: the group kind its gradient is reduced over across replicas ("dp_cp": the
  data-parallel replicas and the context-parallel ranks, which hold copies for other tokens;
  "expert_dp" for experts).
- ``copy_of``: the model-space name of the parameter this one is a copy of (the last pipeline
  stage's copy of a tied embedding): saved and counted under that name, on its owner only.

The gradient norm counts a parameter once: on the ranks whose index is 0 along every axis in
``replicated_axes`` (the axes it is not split over, of those that hold copies of one replica),
and never for a copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

import torch

# Axes whose ranks hold parts of one model replica: a parameter not split over one of them has a
# copy on each of its ranks (identical once partial gradients are completed).
# (cp ranks hold copies too, but are reduced with the data-parallel replicas: "dp_cp".)
REPLICA_AXES = ("tp",)
_ATTRIBUTE = "_megacpm_param_spec"


@dataclass(frozen=True)
class ParamSpec:
    shard_dims: Mapping[str, int] = field(default_factory=dict)
    padded_rows: Optional[Tuple[int, int]] = None
    partial_over: Tuple[str, ...] = ()
    reduced_over: str = "dp_cp"
    copy_of: Optional[str] = None

    def __post_init__(self) -> None:
        # Frozen: a plain dict copy, so a caller's later edit of its mapping cannot reach the spec.
        object.__setattr__(self, "shard_dims", dict(self.shard_dims))
        object.__setattr__(self, "partial_over", tuple(self.partial_over))
        if self.padded_rows is not None and self.shard_dims.get("tp") != 0:
            raise ValueError("ParamSpec.padded_rows needs a split of dim 0 (shard_dims={'tp': 0})")

    def shard_dim(self, axis: str) -> Optional[int]:
        return self.shard_dims.get(axis)

    def replicated_axes(self) -> Tuple[str, ...]:
        return tuple(axis for axis in REPLICA_AXES if axis not in self.shard_dims)

    def counted_in_norm(self, coords: Dict[str, int]) -> bool:
        """Whether this rank's copy counts in the global gradient norm (``coords``: this rank's axis
        indices)."""
        if self.copy_of is not None:
            return False
        return all(coords.get(axis, 0) == 0 for axis in self.replicated_axes())

    def with_changes(self, **changes) -> "ParamSpec":
        values = {"shard_dims": self.shard_dims, "padded_rows": self.padded_rows, "partial_over": self.partial_over,
                  "reduced_over": self.reduced_over, "copy_of": self.copy_of}
        unknown = set(changes) - set(values)
        if unknown:
            raise TypeError(f"ParamSpec has no field(s) {sorted(unknown)}")
        values.update(changes)
        return ParamSpec(**values)


def set_param_spec(param: torch.Tensor, spec: ParamSpec) -> None:
    """Attach ``spec`` to ``param`` (replacing any earlier one: a plan refines what it built)."""
    if not isinstance(spec, ParamSpec):
        raise TypeError(f"expected a ParamSpec, got {type(spec).__name__}")
    setattr(param, _ATTRIBUTE, spec)


def param_spec(param: torch.Tensor) -> ParamSpec:
    """The spec of a parameter of a sharded model; an error for one no plan described."""
    spec = getattr(param, _ATTRIBUTE, None)
    if spec is None:
        raise KeyError(f"parameter of shape {tuple(param.shape)} has no ParamSpec (built outside a sharded model?)")
    return spec


def has_param_spec(param: torch.Tensor) -> bool:
    return getattr(param, _ATTRIBUTE, None) is not None
