#!/usr/bin/env python
"""Training-step throughput of a config: tokens/s, the split between forward+backward (with the
gradient reductions) and the optimizer update, peak memory, model FLOPs per token, achieved FLOP/s
and MFU (where the device's peak is known). One process: the trainer's own step (TrainModule).

  python tools/bench_train.py tiny --steps 10
  python tools/bench_train.py tiny --model.hidden_size=512 --model.num_hidden_layers=8 --json
  python tools/bench_train.py tiny --against HEAD~3 --rounds 3   # this tree vs a git ref, as a ratio

``--against REF`` checks REF out into a temporary git worktree and runs this benchmark there and here
alternately, ``--rounds`` times each, in fresh processes on the same machine, then prints both
medians and the ratio (this tree / REF): a speed target is a ratio measured side by side.

``--compile`` times megacpm's step with ``train.compile`` (each decoder block compiled) against the
eager one, in this process and in alternating rounds, and prints the ratio and the compile time.
``--vs-hf`` times, in the same way, megacpm's step against the naive loop it replaces: transformers'
``LlamaForCausalLM`` loaded from the ``--llama-format`` export of the same weights (so the same function: the first batch's losses are checked to agree before anything is
timed), a plain cross entropy on its logits, ``clip_grad_norm_`` and ``torch.optim.AdamW``, on the
same batches and micro-batching. It prints both tokens/s and the ratio (megacpm / transformers).
Both print, per loop, the share of its step that the weight matmuls alone would take at this machine's
dense GEMM rate (measured in the same run at the model's LM-head shape): the rest is all that any
faster step could remove.

The batch is random token ids (the data pipeline is not what this measures); the model, optimizer,
precision and micro-batching are the trainer's own.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megacpm.config import ConfigError, load_config, validate  # noqa: E402
from megacpm.data.batch import IGNORE_INDEX, Batch  # noqa: E402
from megacpm.model import count_parameters  # noqa: E402
from megacpm.parallel.context import ParallelContext  # noqa: E402
from megacpm.train.device import param_dtype, resolve_device  # noqa: E402
from megacpm.train.flops import flops_per_token, matmul_parameters  # noqa: E402
from megacpm.train.train_module import TrainModule  # noqa: E402

# Dense bf16 peak FLOP/s of known accelerators (vendor datasheets), for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batches(cfg, count: int, seed: int = 0):
    t = cfg.train
    gen = torch.Generator().manual_seed(seed)
    return [Batch.from_tokens(torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, t.seq_len + 1),
                                            generator=gen)) for _ in range(count)]


def measure(cfg, steps: int, warmup: int) -> dict:
    device = resolve_device(cfg)
    dtype = param_dtype(cfg, device)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    t = cfg.train
    step_fn = TrainModule(cfg, ParallelContext.single(device), generator=torch.Generator().manual_seed(t.seed),
                          param_dtype=dtype)
    tokens_per_step = t.global_batch_size * t.seq_len

    timings = {"forward_backward": [], "optimizer": [], "step": []}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i, batch in enumerate(random_batches(cfg, warmup + steps)):
        synchronize(device)
        start = time.perf_counter()
        _, norm = step_fn.compute_gradients(batch)
        synchronize(device)
        middle = time.perf_counter()
        step_fn.apply_gradients(norm, cfg.optim.lr)
        synchronize(device)
        end = time.perf_counter()
        if i >= warmup:
            for key, value in (("forward_backward", middle - start), ("optimizer", end - middle), ("step", end - start)):
                timings[key].append(value)

    step_s = statistics.median(timings["step"])
    counts = count_parameters(cfg.model)
    flops = flops_per_token(cfg.model, t.seq_len)["training"]
    achieved = flops * tokens_per_step / step_s
    peak = device_peak_flops(device)
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device)
    else:  # the process's peak resident set (Linux reports KiB)
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "config": cfg.run.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "precision": "bf16 params, fp32 master" if dtype == torch.bfloat16 else "fp32",
        "total_params": counts["total"],
        "non_embedding_params": counts["non_embedding"],
        "tokens_per_step": tokens_per_step,
        "step_s": step_s,
        "tokens_per_sec": tokens_per_step / step_s,
        "forward_backward_s": statistics.median(timings["forward_backward"]),
        "optimizer_s": statistics.median(timings["optimizer"]),
        "flops_per_token": flops,
        "achieved_flops": achieved,
        "mfu": achieved / peak if peak else None,
        "peak_memory_bytes": peak_mem,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }


REPO = Path(__file__).resolve().parents[1]


class NaiveLlamaLoop:
    """The loop megacpm replaces: transformers' LlamaForCausalLM (the --llama-format export of the
    same weights) trained with a plain cross entropy, global-norm clipping and torch AdamW."""

    def __init__(self, cfg, weights, device: torch.device):
        from transformers import LlamaForCausalLM  # local: transformers is a dev extra

        from megacpm.huggingface import write_hf_directory

        with tempfile.TemporaryDirectory(prefix="bench-train-hf-") as tmp:
            path = write_hf_directory(Path(tmp) / "llama", cfg.model, weights, torch.float32, llama=True)
            self.model = LlamaForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32,
                                                          attn_implementation="sdpa").to(device)
        self.model.train()
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.cfg, self.device = cfg, device
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.train.uses_bf16(device.type) and device.type == "cuda")

    def _loss_sum(self, batch: Batch) -> torch.Tensor:
        with self.autocast:
            logits = self.model(input_ids=batch.input_ids.to(self.device)).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch.labels.to(self.device).flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")

    @torch.no_grad()
    def loss(self, batch: Batch) -> float:
        return float(self._loss_sum(batch)) / batch.num_loss_tokens()

    def step(self, batch: Batch) -> None:
        total = batch.num_loss_tokens()
        for micro in batch.split_rows(self.cfg.train.micro_batch_size):
            (self._loss_sum(micro) / total).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def gemm_flops(cfg, device: torch.device, trials: int = 3, min_seconds: float = 0.2) -> float:
    """The machine's dense matmul rate at this model's sizes: the LM head's three products (logits
    [T, H] x [H, V], hidden gradient [T, V] x [V, H], weight gradient [V, T] x [T, H], T a micro-batch's
    tokens), in the parameter dtype, each timed ``trials`` times for at least ``min_seconds``; the best
    rate, so neither a busy moment nor an awkward shape lowers the ceiling."""
    t = cfg.train
    dtype = param_dtype(cfg, device)
    tokens, hidden, vocab = t.micro_batch_size * t.seq_len, cfg.model.hidden_size, cfg.model.vocab_size
    best = 0.0
    for m, k, n in ((tokens, hidden, vocab), (tokens, vocab, hidden), (vocab, tokens, hidden)):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        a @ b
        for _ in range(trials):
            calls, start = 0, time.perf_counter()
            synchronize(device)
            while time.perf_counter() - start < min_seconds:
                a @ b
                calls += 1
                synchronize(device)
            best = max(best, 2 * m * k * n * calls / (time.perf_counter() - start))
    return best


class _OurLoop:
    """megacpm's trainer step (TrainModule), eager or with train.compile."""

    def __init__(self, cfg, device: torch.device, compiled: bool):
        cfg = copy.deepcopy(cfg)
        cfg.train.compile = compiled
        self.module = TrainModule(cfg, ParallelContext.single(device), generator=torch.Generator().manual_seed(cfg.train.seed),
                                  param_dtype=param_dtype(cfg, device))
        self.lr = cfg.optim.lr

    def loss(self, batch: Batch) -> float:
        return self.module.evaluate(batch)["loss"]

    def step(self, batch: Batch) -> None:
        self.module.step(batch, self.lr)


def compare_loops(cfg, steps: int, warmup: int, rounds: int, compiled: bool, hf: bool) -> dict:
    """megacpm's eager step against its compiled step (``compiled``) and/or NaiveLlamaLoop (``hf``) on
    the same weights and batches, alternating rounds of ``steps`` steps each in this process; tokens/s
    from the medians of the per-step times, their ratios, and each loop's achieved FLOP/s against the
    machine's GEMM rate measured here too."""
    device = resolve_device(cfg)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    t = cfg.train
    loops = {"megacpm": _OurLoop(cfg, device, compiled=False)}
    if compiled:
        loops["megacpm_compiled"] = _OurLoop(cfg, device, compiled=True)
    if hf:
        weights = {name: p.detach().float().cpu() for name, p in loops["megacpm"].module.model.params_by_name().items()}
        loops["transformers"] = NaiveLlamaLoop(cfg, weights, device)
    batches = random_batches(cfg, warmup + rounds * steps)
    # The same function, or a ratio means nothing: every loop's loss on the first batch, untrained.
    first = {name: loop.loss(batches[0]) for name, loop in loops.items()}
    tolerance = 1e-4 if not t.uses_bf16(device.type) else 3e-2
    for name, value in first.items():
        if abs(value - first["megacpm"]) > tolerance * max(1.0, abs(first["megacpm"])):
            raise SystemExit(f"bench_train: error: megacpm's loss {first['megacpm']:.6f} and {name}'s {value:.6f} "
                             f"differ on the same weights: not the same function, no comparison")
    for batch in batches[:warmup]:  # the compiled loop compiles here
        for loop in loops.values():
            loop.step(batch)
    timings = {name: [] for name in loops}
    for r in range(rounds):
        chunk = batches[warmup + r * steps: warmup + (r + 1) * steps]
        for name, loop in loops.items():
            for batch in chunk:
                synchronize(device)
                start = time.perf_counter()
                loop.step(batch)
                synchronize(device)
                timings[name].append(time.perf_counter() - start)
    tokens = t.global_batch_size * t.seq_len
    flops = flops_per_token(cfg.model, t.seq_len)["training"]
    weight_flops = 6 * matmul_parameters(cfg.model)  # per token: the weight matmuls, forward and backward
    gemm = gemm_flops(cfg, device)
    result = {"config": cfg.run.name, "tokens_per_step": tokens, "gemm_flops": gemm}
    for name, times in timings.items():
        rate = tokens / statistics.median(times)
        result[f"{name}_tokens_per_sec"] = rate
        result[f"{name}_achieved_flops"] = rate * flops
        # The share of the step the weight GEMMs alone would take at the measured GEMM rate: what
        # is left (attention, norms, the optimizer, overhead) is all a faster step can remove.
        result[f"{name}_weight_gemm_share"] = rate * weight_flops / gemm
        result[f"first_loss_{name}"] = first[name]
    if hf:
        result["ratio"] = result["megacpm_tokens_per_sec"] / result["transformers_tokens_per_sec"]
    if compiled:
        result["compiled_vs_eager"] = result["megacpm_compiled_tokens_per_sec"] / result["megacpm_tokens_per_sec"]
        stats = loops["megacpm_compiled"].module.model.compile_stats
        result["compile_seconds"] = sum(stats.seconds.values())
        result["compiled_graphs"] = dict(stats.graphs)
        if hf:
            result["compiled_vs_transformers"] = (result["megacpm_compiled_tokens_per_sec"]
                                                  / result["transformers_tokens_per_sec"])
    return result


def print_comparison(result: dict) -> None:
    losses = ", ".join(f"{key[len('first_loss_'):]} {value:.6f}" for key, value in result.items()
                       if key.startswith("first_loss_"))
    print(f"config {result['config']}: first-batch loss {losses}")
    gemm = result["gemm_flops"]
    labels = {"megacpm": "megacpm", "megacpm_compiled": "megacpm (train.compile)",
              "transformers": "transformers (LlamaForCausalLM + AdamW)"}
    for name, label in labels.items():
        if f"{name}_tokens_per_sec" in result:
            achieved = result[f"{name}_achieved_flops"]
            print(f"  {label:<40} {result[f'{name}_tokens_per_sec']:>9,.0f} tok/s  {achieved / 1e9:7.1f} model "
                  f"GFLOP/s, weight GEMMs {100 * result[f'{name}_weight_gemm_share']:.0f}% of the step")
    print(f"  GEMM rate here: {gemm / 1e9:.1f} GFLOP/s (the best of the LM head's three products); "
          f"'weight GEMMs' = 6 x matmul weights x tokens/s at that rate")
    if "ratio" in result:
        print(f"  megacpm / transformers           {result['ratio']:.3f}")
    if "compiled_vs_eager" in result:
        print(f"  compiled / eager megacpm         {result['compiled_vs_eager']:.3f} "
              f"(compiling: {result['compile_seconds']:.1f} s in the backend, graphs {result['compiled_graphs']})")
    if "compiled_vs_transformers" in result:
        print(f"  compiled megacpm / transformers  {result['compiled_vs_transformers']:.3f}")


def _run_here_and_there(tree: Path, argv) -> float:
    """tokens/s of this benchmark run (``argv`` without --against) in the checkout ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, str(tree / "tools" / "bench_train.py"), *argv, "--json"], cwd=tree,
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench_train: error: the run in {tree} failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_sec"]


def compare(ref: str, rounds: int, argv) -> int:
    """This tree against git ``ref``, alternating runs; prints the medians and their ratio."""
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    other = work / "ref"
    try:
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(other), ref], check=True)
        # The reference tree imports its own megacpm: its kernels/ as megacpm.kernels and the built
        # C++ helpers, as an installed checkout would have them.
        (other / "megacpm" / "kernels").symlink_to(other / "kernels")
        for built in REPO.joinpath("megacpm").glob("_C*"):
            shutil.copy2(built, other / "megacpm" / built.name)
        here, there = [], []
        for i in range(rounds):
            there.append(_run_here_and_there(other, argv))
            here.append(_run_here_and_there(REPO, argv))
            print(f"round {i + 1}/{rounds}: {ref} {there[-1]:,.0f} tok/s, this tree {here[-1]:,.0f} tok/s", flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(other)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    ratio = statistics.median(here) / statistics.median(there)
    print(f"median tokens/s: {ref} {statistics.median(there):,.0f}, this tree {statistics.median(here):,.0f}; "
          f"ratio {ratio:.3f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("config", help="preset name or YAML file")
    parser.add_argument("--steps", type=int, default=5, help="measured steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--against", metavar="REF", help="also run at git REF, alternately, and print the ratio")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree with --against, "
                                                                   "alternating rounds with --vs-hf")
    parser.add_argument("--vs-hf", action="store_true",
                        help="time megacpm's step against transformers' LlamaForCausalLM + torch AdamW "
                             "(the same weights), in alternating rounds; print the ratio")
    parser.add_argument("--compile", action="store_true",
                        help="time megacpm's step with train.compile against the eager one (and against "
                             "transformers with --vs-hf), in alternating rounds; print the ratios")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        validate(cfg, check_data=False)
    except ConfigError as exc:
        print(f"bench_train: error: {exc}", file=sys.stderr)
        return 2
    if args.against:
        forwarded = [args.config, f"--steps={args.steps}", f"--warmup={args.warmup}", *overrides]
        return compare(args.against, args.rounds, forwarded)
    if args.vs_hf or args.compile:
        versus = compare_loops(cfg, args.steps, args.warmup, args.rounds, compiled=args.compile, hf=args.vs_hf)
        if args.json:
            print(json.dumps(versus))
        else:
            print_comparison(versus)
        return 0
    result = measure(cfg, args.steps, args.warmup)
    if args.json:
        print(json.dumps(result))
        return 0
    step = result["step_s"]
    print(f"config {result['config']} on {result['device']} ({result['precision']}), "
          f"{result['total_params'] / 1e6:.1f}M params ({result['non_embedding_params'] / 1e6:.1f}M non-embedding)")
    print(f"  tokens/s        {result['tokens_per_sec']:,.0f}  ({result['tokens_per_step']} tokens in {step:.3f} s/step)")
    for part in ("forward_backward", "optimizer"):
        print(f"  {part:<17} {result[part + '_s']:.3f} s ({100 * result[part + '_s'] / step:.0f}%)")
    print(f"  FLOPs/token     {result['flops_per_token'] / 1e6:.1f} MFLOP (6N + attention)")
    print(f"  achieved        {result['achieved_flops'] / 1e9:.1f} GFLOP/s"
          + (f", MFU {100 * result['mfu']:.1f}%" if result["mfu"] is not None else " (device peak unknown: no MFU)"))
    print(f"  peak memory     {result['peak_memory_bytes'] / 2**20:.0f} MiB ({result['peak_memory_kind']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
