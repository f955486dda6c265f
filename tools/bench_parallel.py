#!/usr/bin/env python
"""Pipeline bubble, measured: real pipeline processes running megacpm's 1F1B and interleaved
schedules over gloo, against the analytic (pp - 1) / (m + pp - 1) and the schedule simulator.

  python tools/bench_parallel.py                       # the default table
  python tools/bench_parallel.py --pp 4 --micro-batches 8 --vpp 1 2 --forward-ms 40

Each stage's work is a timed sleep (forward t_f per stage, backward 2 t_f, split evenly over the
vpp chunks), so the processes do not compete for this machine's cores and what is measured is
the schedule's idle time plus communication latency. The measured bubble is 1 - busy / makespan,
busy being the stage's known compute time. Also printed: the tensor-parallel communication per
decoder layer and step in Megatron's analysis, for the configured shape.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from megacpm.parallel.context import ParallelContext  # noqa: E402
from megacpm.parallel.local_launch import run_distributed  # noqa: E402
from megacpm.parallel.pipeline import PipelineSpec, run_pipeline  # noqa: E402
from megacpm.parallel.pipeline_schedule import one_f_one_b_bubble, simulate  # noqa: E402

SHAPE = (1, 4)  # the activation passed between stages: tiny, so latency not bandwidth is measured


class _TimedWork(torch.autograd.Function):
    """Identity whose forward and backward each take a fixed time (a stand-in for a model chunk)."""

    @staticmethod
    def forward(ctx, x, forward_s, backward_s):
        ctx.backward_s = backward_s
        time.sleep(forward_s)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad, None, None


class TimedChunk(nn.Module):
    def __init__(self, forward_s: float, backward_s: float):
        super().__init__()
        self.forward_s, self.backward_s = forward_s, backward_s
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, micro_batch=None):  # the pipeline passes the micro-batch index
        return _TimedWork.apply(x, self.forward_s, self.backward_s) * self.scale


def _measure_rank(pp: int, vpp: int, micro_batches: int, forward_s: float):
    ctx = ParallelContext.initialize(pp=pp, vpp=vpp, timeout_s=300)
    chunks = [TimedChunk(forward_s / vpp, 2 * forward_s / vpp) for _ in range(vpp)]
    spec = PipelineSpec(pp=pp, rank=ctx.pp_rank, vpp=vpp, group=ctx.group("pp"),
                        group_ranks=ctx.group_ranks["pp"], activation_shape=SHAPE)
    # Inputs that need a gradient, so the first stage runs its (timed) backward too.
    inputs = [torch.ones(SHAPE, requires_grad=True) for _ in range(micro_batches)]
    dist.barrier()
    start = time.perf_counter()
    run_pipeline(chunks, spec, inputs, lambda out, i: out.sum())
    finish = time.perf_counter()
    ends = [None] * pp
    dist.all_gather_object(ends, (start, finish))
    return ends


def measure_bubble(pp: int, vpp: int, micro_batches: int, forward_s: float) -> float:
    spans = run_distributed(_measure_rank, pp, args=(pp, vpp, micro_batches, forward_s), timeout=600)[0]
    start = min(s for s, _ in spans)
    makespan = max(f for _, f in spans) - start
    busy = micro_batches * 3 * forward_s  # forward + 2 x forward per micro-batch on every stage
    return 1 - busy / makespan


def tp_traffic(hidden: int, seq: int, micro_batch: int, bytes_per_value: int, tp: int) -> str:
    volume = micro_batch * seq * hidden * bytes_per_value
    ring = 2 * (tp - 1) / tp * volume  # bytes each rank sends in a ring all-reduce
    return (f"TP per decoder layer, forward, no SP: 2 all-reduces of b*s*h = {volume / 2**20:.2f} MiB "
            f"({ring / 2**20:.2f} MiB sent per rank each, ring); backward: 2 more; "
            f"with SP: 2 all-gathers + 2 reduce-scatters of the same volume (half the bytes each)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--vpp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--forward-ms", type=float, default=30.0, help="forward time of one stage")
    args = parser.parse_args(argv)
    forward_s = args.forward_ms / 1000
    print("pp  vpp  m   analytic_1f1b  simulated  measured")
    for pp in args.pp:
        for m in args.micro_batches:
            for vpp in args.vpp:
                if vpp > 1 and m % pp:
                    continue
                simulated = simulate(pp, m, vpp)["bubble_fraction"]
                measured = measure_bubble(pp, vpp, m, forward_s)
                print(f"{pp:<3} {vpp:<4} {m:<3} {one_f_one_b_bubble(pp, m):<14.3f} {simulated:<10.3f} {measured:.3f}",
                      flush=True)
    print(tp_traffic(hidden=2304, seq=4096, micro_batch=1, bytes_per_value=2, tp=8) + " (MiniCPM-2.4B, bf16, tp 8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
