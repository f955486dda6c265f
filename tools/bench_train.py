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

``--vs-hf`` times, in this process and in alternating rounds, megacpm's step against the naive loop it
replaces: transformers' ``LlamaForCausalLM`` loaded from the ``--llama-format`` export of the same
weights (so the same function: the first batch's losses are checked to agree before anything is
timed), a plain cross entropy on its logits, ``clip_grad_norm_`` and ``torch.optim.AdamW``, on the
same batches and micro-batching. It prints both tokens/s and the ratio (megacpm / transformers).

The batch is random token ids (the data pipeline is not what this measures); the model, optimizer,
precision and micro-batching are the trainer's own.
"""
from __future__ import annotations

import argparse
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
from megacpm.train.flops import flops_per_token  # noqa: E402
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
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.train.uses_bf16 and device.type == "cuda")

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


def compare_with_hf(cfg, steps: int, warmup: int, rounds: int) -> dict:
    """megacpm's step against NaiveLlamaLoop on the same weights and batches, alternating rounds of
    ``steps`` steps each in this process; medians of the per-step times."""
    device = resolve_device(cfg)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    t = cfg.train
    ours = TrainModule(cfg, ParallelContext.single(device), generator=torch.Generator().manual_seed(t.seed),
                       param_dtype=param_dtype(cfg, device))
    weights = {name: p.detach().float().cpu() for name, p in ours.model.params_by_name().items()}
    theirs = NaiveLlamaLoop(cfg, weights, device)
    batches = random_batches(cfg, warmup + rounds * steps)
    # The same function, or the ratio means nothing: both losses on the first batch, untrained.
    our_loss, their_loss = ours.evaluate(batches[0])["loss"], theirs.loss(batches[0])
    tolerance = 1e-4 if not t.uses_bf16 else 3e-2
    if abs(our_loss - their_loss) > tolerance * max(1.0, abs(our_loss)):
        raise SystemExit(f"bench_train: error: megacpm's loss {our_loss:.6f} and the Llama export's {their_loss:.6f} "
                         f"differ on the same weights: not the same function, no comparison")
    for batch in batches[:warmup]:
        ours.step(batch, cfg.optim.lr)
        theirs.step(batch)
    timings = {"megacpm": [], "transformers": []}
    for r in range(rounds):
        chunk = batches[warmup + r * steps: warmup + (r + 1) * steps]
        for name, run in (("megacpm", lambda b: ours.step(b, cfg.optim.lr)), ("transformers", theirs.step)):
            for batch in chunk:
                synchronize(device)
                start = time.perf_counter()
                run(batch)
                synchronize(device)
                timings[name].append(time.perf_counter() - start)
    tokens = t.global_batch_size * t.seq_len
    result = {name: tokens / statistics.median(times) for name, times in timings.items()}
    return {"config": cfg.run.name, "tokens_per_step": tokens, "first_loss_megacpm": our_loss,
            "first_loss_transformers": their_loss, "megacpm_tokens_per_sec": result["megacpm"],
            "transformers_tokens_per_sec": result["transformers"], "ratio": result["megacpm"] / result["transformers"]}


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
    if args.vs_hf:
        versus = compare_with_hf(cfg, args.steps, args.warmup, args.rounds)
        if args.json:
            print(json.dumps(versus))
        else:
            print(f"config {versus['config']}: first-batch loss megacpm {versus['first_loss_megacpm']:.6f}, "
                  f"transformers {versus['first_loss_transformers']:.6f}")
            print(f"  megacpm       {versus['megacpm_tokens_per_sec']:,.0f} tok/s")
            print(f"  transformers  {versus['transformers_tokens_per_sec']:,.0f} tok/s (LlamaForCausalLM + AdamW)")
            print(f"  ratio         {versus['ratio']:.3f} (megacpm / transformers)")
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
