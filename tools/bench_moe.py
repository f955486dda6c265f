#!/usr/bin/env python
"""The MoE layer's forward + backward throughput (tokens/s), side by side in one run, as ratios:

  moe    megacpm.model.moe.MoEMLP (E experts, top-k routing, dropless): the router, the assignments sorted
         by expert, grouped_swiglu (three megacpm.kernels.grouped_matmul calls), the weighted index_add
  dense  the dense SwiGLU MLP of the same active FLOPs: intermediate k * I (megacpm.model.minicpm.MLP's
         down(silu(gate(x)) * up(x)), with its own weights)
  loop   the naive reference written here, on the moe layer's own weights: the same fp32 softmax top-k
         routing (weights renormalised), then for each expert: select its tokens, SwiGLU, weighted index_add

  python tools/bench_moe.py                                   # tiny CPU sizes, a few seconds
  python tools/bench_moe.py --hidden 256 --intermediate 512 --experts 8 --top-k 2 --tokens 2048
  python tools/bench_moe.py --device cuda --hidden 2304 --intermediate 5760 --tokens 16384 --json

Before anything is timed, moe's output and its gradients (of the input, the router and the three expert
weights) are checked to equal loop's (allclose, tolerances by dtype): the ratio then compares two
implementations of one function. A mismatch is one line and exit status 1.

One step of a variant: the gradients set to None, the forward on x [tokens, hidden] (requires grad), the
backward of a fixed random output gradient (CUDA synchronised before and after). The steps run round
robin (moe, dense, loop, then rotated), --warmup rounds untimed, then --steps timed; each variant's step
time is its median. Reported: step ms, tokens/s, how many times faster than dense and than loop
(tokens/s ratios), and the achieved TFLOP/s of the expert (or dense MLP) matmuls: 18 * hidden * k * I
FLOPs a token for forward + backward (the router's 6 * hidden * E is left out).

--ep N (N > 1) also measures expert parallelism's dispatch in N gloo processes on this machine: each
rank routes its own --tokens through one MoE layer whose experts are split over the N ranks
(megacpm.parallel.experts), forward and backward under megacpm.parallel.comm_stats.CommAccounting.
Reported per rank: the all-to-all bytes it sent, against the analytic volume 2 * (A + R) * hidden *
bytes + E * 8, A its tokens * k assignments (dispatched forward, their gradients returned backward)
and R the assignments its experts received (their outputs returned forward, gradients dispatched
backward), plus the counts exchange; and the part that left the rank (rows of experts held elsewhere).

The grouped GEMM impl moe gets is grouped_matmul's "auto": Triton on CUDA (or under TRITON_INTERPRET=1,
Triton's CPU interpreter: then moe's time is the interpreter's), one matmul per expert otherwise; the
report names it. --dtype auto is bf16 on CUDA and fp32 on the CPU; parameters and activations are in that
dtype (no autocast), the routing in fp32 as MoEMLP does it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _entry, when imported from its path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _entry import OneLineParser, run_tool  # noqa: E402
from megacpm.kernels.dispatch import interpreter_enabled, triton_available  # noqa: E402
from megacpm.model.moe import MoEMLP  # noqa: E402

PROG = "bench_moe.py"
VARIANTS = ("moe", "dense", "loop")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# allclose(got, want, rtol, atol * max|want|): fp32 differs only in summation order (Triton vs torch on
# CUDA), 16-bit by a rounding of the outputs and of the hidden activations.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}


class UsageError(Exception):
    pass


class MismatchError(Exception):
    """moe and the loop reference compute different functions (the benchmark would compare nothing)."""


# ---------------------------------------------------------------------------------------------------
# The three variants

def loop_reference(x: torch.Tensor, router: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                   k: int) -> torch.Tensor:
    """The MoE layer the naive way: fp32 softmax over the router logits, the top k renormalised, then for
    each expert: its tokens selected, SwiGLU down(silu(gate(x)) * up(x)), the output weighted and
    index_added into place. x [tokens, H], router [E, H], w1/w3 [E, I, H], w2 [E, H, I]."""
    probs = torch.softmax(F.linear(x, router).float(), dim=-1)
    top_weight, top_expert = torch.topk(probs, k, dim=-1)
    top_weight = top_weight / top_weight.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, slot = torch.nonzero(top_expert == e, as_tuple=True)
        if token.numel() == 0:
            continue
        xe = x[token]
        ye = F.linear(F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e]), w2[e])
        out = out.index_add(0, token, ye * top_weight[token, slot].to(ye.dtype)[:, None])
    return out


def dense_swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """megacpm.model.minicpm.MLP's forward: down(silu(gate(x)) * up(x)) with nn.Linear weights."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def build(args, device: torch.device, dtype: torch.dtype):
    """The moe layer and the dense MLP's weights, drawn on the CPU in fp32 from --seed (std 1/sqrt(fan_in),
    so activations and router logits are O(1)), then moved and cast."""
    gen = torch.Generator().manual_seed(args.seed)
    h, i, e, k = args.hidden, args.intermediate, args.experts, args.top_k

    def draw(*shape, fan_in):
        return torch.randn(*shape, generator=gen).mul_(fan_in ** -0.5)
    moe = MoEMLP(h, i, e, k)  # dropless (no capacity factor)
    with torch.no_grad():
        moe.gate.weight.copy_(draw(e, h, fan_in=h))
        moe.w1.copy_(draw(e, i, h, fan_in=h))
        moe.w3.copy_(draw(e, i, h, fan_in=h))
        moe.w2.copy_(draw(e, h, i, fan_in=i))
    moe = moe.to(device=device, dtype=dtype)
    dense = [draw(k * i, h, fan_in=h), draw(k * i, h, fan_in=h), draw(h, k * i, fan_in=k * i)]
    dense = [w.to(device=device, dtype=dtype).requires_grad_() for w in dense]
    x = torch.randn(args.tokens, h, generator=gen).to(device=device, dtype=dtype)
    grad_out = torch.randn(args.tokens, h, generator=gen).to(device=device, dtype=dtype)
    return moe, dense, x, grad_out


def variant_functions(moe: MoEMLP, dense: list[torch.Tensor]):
    """name -> (forward of x, the parameters whose gradients it fills)."""
    moe_params = list(moe.parameters())
    return {
        "moe": (lambda x: moe(x)[0], moe_params),
        "dense": (lambda x: dense_swiglu(x, *dense), dense),
        "loop": (lambda x: loop_reference(x, moe.gate.weight, moe.w1, moe.w3, moe.w2, moe.k), moe_params),
    }


# ---------------------------------------------------------------------------------------------------
# The same function: moe against the loop reference

def check_close(what: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> float:
    """max |got - want| / max |want|; raises MismatchError unless allclose(got, want, rtol, atol * max|want|)
    with the dtype's TOLERANCES (and the same shape)."""
    if got.shape != want.shape:
        raise MismatchError(f"{what}: moe's shape {tuple(got.shape)} is not the loop reference's {tuple(want.shape)}")
    got, want = got.detach().double(), want.detach().double()
    scale = float(want.abs().max()) if want.numel() else 0.0
    difference = float((got - want).abs().max()) if want.numel() else 0.0
    error = difference / scale if scale > 0 else difference
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    if not torch.allclose(got, want, rtol=rtol, atol=atol * max(scale, 1e-30)) or not torch.isfinite(got).all():
        raise MismatchError(f"{what}: moe differs from the loop reference: max |difference| / max |reference| "
                            f"{error:.2e} (rtol {rtol:.0e}, atol {atol:.0e} x max |reference|, {str(dtype)[6:]})")
    return error


def check_same_function(moe: MoEMLP, x: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> dict:
    """moe's output and gradients (x, router, w1, w3, w2) against the loop reference's, on the benchmark's
    own input and output gradient; the relative errors, or MismatchError."""
    fns = variant_functions(moe, [])
    results = {}
    for name in ("moe", "loop"):
        fn, params = fns[name]
        leaf = x.detach().clone().requires_grad_()
        for p in params:
            p.grad = None
        out = fn(leaf)
        out.backward(grad_out)
        results[name] = {"out": out.detach(), "dx": leaf.grad, "drouter": moe.gate.weight.grad,
                         "dw1": moe.w1.grad, "dw3": moe.w3.grad, "dw2": moe.w2.grad}
    for p in moe.parameters():
        p.grad = None
    return {what: check_close(what, got, results["loop"][what], dtype) for what, got in results["moe"].items()}


# ---------------------------------------------------------------------------------------------------
# Timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def grouped_impl(device: torch.device) -> str:
    """What grouped_matmul's "auto" runs for moe on this device."""
    if triton_available() and (device.type == "cuda" or interpreter_enabled()):
        return "triton (CPU interpreter)" if device.type != "cuda" else "triton"
    return "torch (one matmul per expert)"


def time_round_robin(fns: dict, x: torch.Tensor, grad_out: torch.Tensor, steps: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds of each variant's timed steps, the variants taking turns (the order rotated every round)."""
    names = list(fns)
    times = {name: [] for name in names}
    leaf = x.detach().clone().requires_grad_()
    for round_index in range(warmup + steps):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn, params = fns[name]
            for p in params:
                p.grad = None
            leaf.grad = None
            synchronize(device)
            start = time.perf_counter()
            fn(leaf).backward(grad_out)
            synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def resolve(args) -> tuple[torch.device, torch.dtype]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def measure(args) -> dict:
    device, dtype = resolve(args)
    moe, dense, x, grad_out = build(args, device, dtype)
    with torch.no_grad():
        routing = moe(x)[1]
    counts = torch.bincount(routing.experts.reshape(-1), minlength=args.experts).tolist()
    errors = check_same_function(moe, x, grad_out, dtype)
    times = time_round_robin(variant_functions(moe, dense), x, grad_out, args.steps, args.warmup, device)
    flops_per_token = 18 * args.hidden * args.top_k * args.intermediate
    variants = {}
    for name in VARIANTS:
        step_s = statistics.median(times[name])
        variants[name] = {"step_s": step_s, "tokens_per_sec": args.tokens / step_s,
                          "tflops": flops_per_token * args.tokens / step_s / 1e12}
    for v in variants.values():
        v["x_dense"] = v["tokens_per_sec"] / variants["dense"]["tokens_per_sec"]
        v["x_loop"] = v["tokens_per_sec"] / variants["loop"]["tokens_per_sec"]
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "dtype": str(dtype).removeprefix("torch."), "hidden": args.hidden, "intermediate": args.intermediate,
        "experts": args.experts, "top_k": args.top_k, "dense_intermediate": args.top_k * args.intermediate,
        "tokens": args.tokens, "steps": args.steps, "warmup": args.warmup,
        "grouped_matmul": grouped_impl(device), "expert_rows": counts,
        "matmul_flops_per_token": flops_per_token,
        "check": {"max_rel_error": errors, "rtol": rtol, "atol": atol},
        "variants": variants,
    }


def _dispatch_worker(args) -> dict:
    """One rank of --ep: an expert-parallel MoE layer forward + backward, its all-to-all bytes counted."""
    from megacpm.parallel.comm_stats import CommAccounting
    from megacpm.parallel.context import ParallelContext
    from megacpm.parallel.experts import plan_expert_parallel

    ctx = ParallelContext.initialize(ep=args.ep, timeout_s=120, device_type="cpu")
    torch.manual_seed(args.seed)
    moe = MoEMLP(args.hidden, args.intermediate, args.experts, args.top_k)
    for weight in (moe.gate.weight, moe.w1, moe.w3, moe.w2):
        torch.nn.init.normal_(weight, std=0.02)
    plan_expert_parallel(moe, ctx.group("ep"))
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(args.seed + 1 + ctx.rank),
                    requires_grad=True)
    with CommAccounting(ctx) as accounting:
        out, routing, _ = moe(x)
        out.backward(torch.ones_like(out))
    counts = torch.bincount(routing.experts.reshape(-1), minlength=args.experts)
    everyone = counts.clone()
    torch.distributed.all_reduce(everyone, group=ctx.group("ep"))
    mine = slice(ctx.rank * args.experts // args.ep, (ctx.rank + 1) * args.experts // args.ep)
    return {"summary": accounting.summary(), "assignments": int(counts.sum()), "received": int(everyone[mine].sum()),
            "kept_on_rank": int(counts[mine].sum())}


def measure_dispatch(args) -> dict:
    from megacpm.parallel.local_launch import run_distributed

    element = 4  # fp32 on the CPU
    ranks = []
    for rank, r in enumerate(run_distributed(_dispatch_worker, args.ep, args=(args,), timeout=600)):
        # The EP group's all-to-alls (named by the first role of its ranks: "dp" when ep = dp).
        exchanges = [v for k, v in r["summary"].items() if k.endswith(".all_to_all")]
        counted = {"bytes": sum(v["bytes"] for v in exchanges), "calls": sum(v["calls"] for v in exchanges)}
        # Sent: its assignments (forward dispatch, backward of the return) and the outputs of those it
        # received (forward return, backward of the dispatch); the counts once.
        analytic = 2 * (r["assignments"] + r["received"]) * args.hidden * element + args.experts * 8
        off_rank = 2 * (r["assignments"] + r["received"] - 2 * r["kept_on_rank"]) * args.hidden * element
        ranks.append({"rank": rank, "bytes": counted["bytes"], "calls": counted["calls"], "analytic_bytes": analytic,
                      "off_rank_bytes": off_rank, "x_analytic": counted["bytes"] / analytic})
    return {"ep": args.ep, "ranks": ranks}


def print_dispatch(d: dict) -> None:
    print(f"expert-parallel dispatch over {d['ep']} gloo ranks (one MoE layer, forward + backward, fp32):")
    print(f"  {'rank':>4} {'all-to-all bytes':>17} {'calls':>6} {'analytic':>12} {'x analytic':>11} {'off-rank':>12}")
    for r in d["ranks"]:
        print(f"  {r['rank']:>4} {r['bytes']:>17,} {r['calls']:>6} {r['analytic_bytes']:>12,} {r['x_analytic']:>11.4f} "
              f"{r['off_rank_bytes']:>12,}")


def print_table(r: dict) -> None:
    empty = sum(1 for c in r["expert_rows"] if c == 0)
    print(f"MoE layer forward + backward on {r['device']}, {r['dtype']}: {r['tokens']} tokens, hidden {r['hidden']}, "
          f"{r['experts']} experts of intermediate {r['intermediate']}, top-{r['top_k']}, dropless; dense MLP of "
          f"intermediate {r['dense_intermediate']}; median of {r['steps']} round-robin steps after {r['warmup']}")
    print(f"moe's grouped GEMM: {r['grouped_matmul']}; rows per expert {r['expert_rows']}"
          + (f" ({empty} empty)" if empty else ""))
    errors = ", ".join(f"{k} {e:.1e}" for k, e in r["check"]["max_rel_error"].items())
    print(f"moe equals the loop reference (max |difference| / max |reference|: {errors}; "
          f"rtol {r['check']['rtol']:.0e}, atol {r['check']['atol']:.0e} x max)")
    print(f"  {'variant':<8} {'step ms':>9} {'tokens/s':>12} {'x dense':>8} {'x loop':>8} {'TFLOP/s':>9}")
    for name, v in r["variants"].items():
        print(f"  {name:<8} {1e3 * v['step_s']:>9.3f} {v['tokens_per_sec']:>12,.0f} {v['x_dense']:>8.3g} "
              f"{v['x_loop']:>8.3g} {v['tflops']:>9.4g}")
    if r["grouped_matmul"].startswith("triton (CPU"):
        print("(TRITON_INTERPRET=1: moe's grouped GEMMs ran in Triton's CPU interpreter; its time is the interpreter's)")


# ---------------------------------------------------------------------------------------------------
# Command line

def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("--hidden", type=_positive, default=64, help="hidden size H (default 64)")
    parser.add_argument("--intermediate", type=_positive, default=128, help="each expert's intermediate size I (128)")
    parser.add_argument("--experts", type=_positive, default=8, help="experts E (8)")
    parser.add_argument("--top-k", type=_positive, default=2, help="experts per token k (2); dense has k * I")
    parser.add_argument("--tokens", type=_positive, default=512, help="tokens a step (512)")
    parser.add_argument("--steps", type=_positive, default=10, help="timed steps per variant (10; median)")
    parser.add_argument("--warmup", type=_non_negative, default=2, help="untimed rounds first (2)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--seed", type=int, default=0, help="the weights', input's and output gradient's seed")
    parser.add_argument("--ep", type=_positive, default=1,
                        help="also measure the dispatch bytes over this many expert-parallel gloo ranks (1: no)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.experts % args.ep:
        parser.error(f"argument --ep: {args.ep} does not divide --experts {args.experts}")
    if args.top_k > args.experts:
        parser.error(f"argument --top-k: {args.top_k} is more than --experts {args.experts}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        result = measure(args)
        if args.ep > 1:
            result["dispatch"] = measure_dispatch(args)
        if args.json:
            print(json.dumps(result))
        else:
            print_table(result)
            if args.ep > 1:
                print_dispatch(result["dispatch"])
        return 0

    return run_tool(PROG, body, {UsageError: 2, MismatchError: 1})


if __name__ == "__main__":
    sys.exit(main())
