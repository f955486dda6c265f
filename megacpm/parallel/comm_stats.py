"""Communication accounting: calls and bytes per collective kind and process group.

    with CommAccounting(ctx) as comm:
        step.step(samples, lr)
    comm.summary()   # {"tp.all_reduce": {"calls": 16, "bytes": 2097152}, "dp.all_reduce": ...}

Every torch.distributed collective and point-to-point call reaches the dispatcher as a ``c10d`` op,
or, inside a block compiled by torch.compile, as the ``_c10d_functional`` op it was traced into
(the mode lets the compiled graphs run and sees their ops), so a dispatch mode active around a step
sees all of them, from the TP mappings, the vocab-parallel loss, the gradient buckets, ZeRO and the
pipeline alike, without any of that code knowing it is being counted. The mode is a context manager held by the
caller: nothing global, and nothing is counted outside it. It costs Python dispatch on every op while
active, so the trainer enables it on logged steps only (a layout moves the same bytes every step).

Bytes are this rank's payload, the message size as NCCL's own benchmarks report it: the tensor
reduced for an all-reduce, the gathered (full) tensor for an all-gather, the full input of a
reduce-scatter, the tensor sent for a send (receives are not counted again).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from megacpm.parallel.context import GROUP_KINDS, ParallelContext

# c10d op -> (kind, index of the argument holding the payload tensors)
_OPS = {
    "allreduce_": ("all_reduce", 0),
    "allreduce_coalesced_": ("all_reduce", 0),
    "allgather_": ("all_gather", 0),  # the output list: the full gathered data
    "_allgather_base_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "allgather_coalesced_": ("all_gather", 0),
    "reduce_scatter_": ("reduce_scatter", 1),  # the input list: the full data
    "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "broadcast_": ("broadcast", 0),
    "send": ("send", 0),
    "alltoall_base_": ("all_to_all", 1),
    "alltoall_": ("all_to_all", 1),
}

# The functional collectives a compiled graph runs instead (torch.compile traces the c10d calls of
# the TP mappings into them): op -> kind. The payload is the first argument; the group is named by
# the "group_name" argument; an all-gather's payload is its input times "group_size".
_FUNCTIONAL_OPS = {
    "all_reduce": "all_reduce",
    "all_reduce_": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_reduce_coalesced_": "all_reduce",
    "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_out": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "all_to_all_single": "all_to_all",
    "broadcast": "broadcast",
    "broadcast_": "broadcast",
}


def _nbytes(payload) -> int:
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, (list, tuple)):
        return sum(_nbytes(item) for item in payload)
    return 0


def _named_arguments(func, args, kwargs) -> Dict[str, object]:
    named = {arg.name: value for arg, value in zip(func._schema.arguments, args)}
    named.update(kwargs)
    return named


class CommAccounting(TorchDispatchMode):
    # A compiled block may run higher-order operators (the RNG state saved around a recomputed
    # op); they reach __torch_dispatch__ and pass through it like any op that is not a collective.
    supports_higher_order_operators = True

    def __init__(self, ctx: Optional[ParallelContext] = None):
        super().__init__()
        # Name each of the context's groups by its role; several roles may share one set of ranks
        # (tp and model_parallel when pp == 1), so groups are told apart by identity.
        self._names: Dict[int, str] = {}
        self._names_by_group_name: Dict[str, str] = {}
        if ctx is not None:
            for kind in GROUP_KINDS:
                group = ctx.group(kind)
                if group is not None:
                    self._names.setdefault(id(group), kind)
                    self._names_by_group_name.setdefault(group.group_name, kind)
        if dist.is_initialized():
            self._names_by_group_name.setdefault(dist.group.WORLD.group_name, "world")
        self.calls: Dict[str, int] = defaultdict(int)
        self.bytes: Dict[str, int] = defaultdict(int)

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Without this, torch.compile runs every frame eagerly while the mode is active and marks
        # the compiled blocks' code to be skipped from then on: one logged step would turn
        # train.compile off for the rest of the run. With it, the compiled graphs run with the
        # mode on, and it sees their functional collectives.
        return True

    def _group_name(self, script_group) -> str:
        group = dist.ProcessGroup.unbox(script_group)
        if group is dist.group.WORLD:
            return "world"
        return self._names.get(id(group), "other")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            entry = _OPS.get(func._schema.name.split("::", 1)[1])
            if entry is not None:
                kind, payload_arg = entry
                # The process group is the op's first script object (a ReduceOp may follow it).
                group = next(a for a in args if isinstance(a, torch.ScriptObject))
                key = f"{self._group_name(group)}.{kind}"
                self.calls[key] += 1
                self.bytes[key] += _nbytes(args[payload_arg])
        elif func.namespace == "_c10d_functional":
            kind = _FUNCTIONAL_OPS.get(func._schema.name.split("::", 1)[1])
            if kind is not None:
                named = _named_arguments(func, args, kwargs)
                key = f"{self._names_by_group_name.get(named['group_name'], 'other')}.{kind}"
                self.calls[key] += 1
                self.bytes[key] += _nbytes(args[0]) * (named["group_size"] if kind == "all_gather" else 1)
        return func(*args, **kwargs)

    def summary(self) -> Dict[str, Dict[str, int]]:
        return {key: {"calls": self.calls[key], "bytes": self.bytes[key]} for key in sorted(self.calls)}

    def metrics(self) -> Dict[str, int]:
        """Flat record fields for metrics.jsonl / TensorBoard: comm_bytes/<group>.<kind>, total."""
        record = {f"comm_bytes/{key}": value for key, value in sorted(self.bytes.items())}
        record["comm_bytes/total"] = sum(self.bytes.values())
        return record


def format_table(summaries: Iterable[Dict[str, Dict[str, int]]]) -> str:
    """A per-(group, kind) table; several summaries (one per rank) are shown side by side."""
    summaries = list(summaries)
    keys = sorted({k for s in summaries for k in s})
    lines = [f"{'group.kind':<28}" + "".join(f"  rank {r}: calls       MiB" for r in range(len(summaries)))]
    for key in keys:
        cells = "".join(f"  {s.get(key, {}).get('calls', 0):>13} {s.get(key, {}).get('bytes', 0) / 2**20:>9.3f}"
                        for s in summaries)
        lines.append(f"{key:<28}{cells}")
    return "\n".join(lines)
