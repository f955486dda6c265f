"""``train.compile``: torch.compile applied per decoder block, with its compilations counted.

Per block, as TorchTitan and OLMo-core do, not the whole model: every block has the same code, so
Dynamo traces one graph and every layer reuses it (parameters are graph inputs, not constants),
compile time does not grow with depth, and what runs between blocks (the pipeline's send and
receive, activation checkpointing's recompute, the loss head) stays eager. ``nn.Module.compile``
compiles the block in place, so parameter names, state dicts, ParamSpecs and gradient hooks are
untouched: a compiled run saves and loads the checkpoints of an eager one.

Every graph the backend compiles is counted by the phase it was traced in: the first training
step and the first evaluation each compile; a later compilation is a recompile (a guard failed:
a changing shape, dtype or Python value), something to find rather than a cost to pay. The
trainer's CompileMonitor callback logs the first and warns about the others.

An MoE block is compiled in its parts: its norms and attention; the mixture stays eager, since
its routing is data-dependent (tokens per expert decide the grouped GEMM's shapes) and it records
the step's routing statistics into a Python object per micro-batch, two things a graph would
either break on or recompile for.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, Iterable, List

import torch
from torch import nn

TRAIN, EVAL = "train", "eval"


@dataclasses.dataclass
class CompileStats:
    """Graphs compiled and seconds spent compiling them (AOTAutograd + Inductor), per phase."""

    graphs: Dict[str, int] = dataclasses.field(default_factory=lambda: {TRAIN: 0, EVAL: 0})
    seconds: Dict[str, float] = dataclasses.field(default_factory=lambda: {TRAIN: 0.0, EVAL: 0.0})

    def backend(self, backend: str = "inductor") -> Callable:
        """A torch.compile backend: ``backend`` itself, counting and timing each graph it compiles."""
        inner = torch._dynamo.lookup_backend(backend)

        def counting_backend(graph_module: torch.fx.GraphModule, example_inputs: List[torch.Tensor]):
            # Dynamo traces with the caller's grad mode: a training graph needs autograd.
            phase = TRAIN if torch.is_grad_enabled() else EVAL
            start = time.perf_counter()
            compiled = inner(graph_module, example_inputs)
            self.seconds[phase] += time.perf_counter() - start
            self.graphs[phase] += 1
            return compiled

        return counting_backend


def decoder_blocks(chunks: Iterable[nn.Module]) -> List[nn.Module]:
    """The decoder layers of these model chunks (MiniCPM or its chunks: their ``layers``)."""
    return [layer for chunk in chunks for layer in chunk.layers]


def compiled_parts(block: nn.Module) -> List[nn.Module]:
    """What of a decoder block is compiled: the block itself, or, around the parts that stay eager
    (an MoE mixture's data-dependent shapes; an attention core that communicates, as under context
    parallelism), the norms and the rest."""
    moe = getattr(block, "is_moe", False)
    communicating_attention = getattr(block.self_attn.attention_fn, "communicates", False)
    if not moe and not communicating_attention:
        return [block]
    parts = [block.input_layernorm, block.post_attention_layernorm]
    if not communicating_attention:
        parts.append(block.self_attn)
    if not moe:
        parts.append(block.mlp)
    return parts


def compile_blocks(chunks: Iterable[nn.Module], backend: str = "inductor") -> CompileStats:
    """Compile every decoder block of ``chunks`` in place; returns the stats its compilations fill.

    ``dynamic=False``: a run's shapes are fixed (micro-batch x seq_len), so each graph is specialised
    to them; a new shape is a visible recompile rather than a silently slower dynamic graph."""
    stats = CompileStats()
    compiled_backend = stats.backend(backend)
    for block in decoder_blocks(chunks):
        for part in compiled_parts(block):
            part.compile(backend=compiled_backend, dynamic=False)
    return stats
