#!/usr/bin/env python
"""Fine-tuning steps against the pretraining step, side by side in one process: tokens/s and peak
memory of an SFT step (unpacked and packed) and of a DPO step (reference precomputed, and live)
on the same model and the same tokens per step.

  python tools/bench_finetune.py tiny --steps 3
  python tools/bench_finetune.py tiny --model.num_hidden_layers=2 --train.seq_len=128 --json

The variants, timed one after the other, each with a fresh TrainModule (the trainer's own step,
``TrainModule.step``), the same seeded initial weights and the same token ids (bench_train's
``random_batches``: ``train.global_batch_size`` rows of ``train.seq_len`` tokens, seed 0):

- ``pretrain``: objective lm, ``Batch.from_tokens``: every token learned;
- ``sft``: objective sft, the same rows with the first half of each (the prompt) not learned;
- ``sft-packed``: the same with ``--pack`` samples per row (positions restarting at each,
  document ids: attention stays inside a sample), each sample's first half not learned;
- ``dpo-precompute``: objective dpo, the rows read as ``global_batch_size / 2`` pairs (chosen,
  rejected; the same rows and tokens), the prompt half not learned; the reference log-probabilities
  of every pair are scored once before the timed steps (``score_rows`` with the initial weights,
  as a fresh run's precompute does) and looked up by sample index (``PrecomputedReference``): the
  timed step is the policy's alone. The one-off scoring time is reported per pair;
- ``dpo-live``: the same pairs, a frozen reference model (``reference_model``) scoring each batch
  (``LiveReference.attach``) inside the timed step: its parameters are in this variant's memory.

``train.global_batch_size`` and ``train.micro_batch_size`` are read as rows (the pretraining
step's); DPO gets half as many pairs of two rows, so every variant moves the same tokens per step
through micro-batches of the same rows.

Peak memory, per variant, from just before its TrainModule is built to after its last step: on
CUDA ``torch.cuda.max_memory_allocated`` (reset between variants, everything of the previous variant
freed); on a CPU the process's peak resident set above its resident set at the variant's start
(Linux: the high-water mark reset through /proc/self/clear_refs after the previous variant's memory
is collected and trimmed back to the system; tracemalloc does not see torch's allocations). Where
the high-water mark cannot be reset, the process peak is reported as it stands (kind says so).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import re
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _entry and bench_train, when imported from its path

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _entry import OneLineParser, run_tool  # noqa: E402
from bench_train import random_batches, synchronize  # noqa: E402
from megacpm.config import ConfigError, load_config, validate  # noqa: E402
from megacpm.data.batch import IGNORE_INDEX, Batch  # noqa: E402
from megacpm.data.chat import SAMPLE_INDEX  # noqa: E402
from megacpm.model import count_parameters  # noqa: E402
from megacpm.parallel.context import ParallelContext  # noqa: E402
from megacpm.train.device import param_dtype, resolve_device  # noqa: E402
from megacpm.train.reference import LiveReference, PrecomputedReference, reference_model, score_rows  # noqa: E402
from megacpm.train.train_module import TrainModule  # noqa: E402

PROG = "bench_finetune"
VARIANTS = ("pretrain", "sft", "sft-packed", "dpo-precompute", "dpo-live")


class UsageError(Exception):
    pass


# -- batches: the same token ids for every variant ----------------------------------------------
def prompt_masked(batch: Batch, starts: torch.Tensor, lengths: torch.Tensor) -> Batch:
    """``batch`` with the first half of each sample (its prompt) not learned; a sample starts at
    ``starts`` [B, S] (its first token's index) and has ``lengths`` [B, S] tokens."""
    index = torch.arange(batch.seq_len).expand_as(batch.input_ids)
    labels = batch.labels.clone()
    labels[index - starts < lengths // 2] = IGNORE_INDEX
    return replace(batch, labels=labels)


def sft_batch(batch: Batch) -> Batch:
    """One sample a row, its first half the prompt."""
    zeros = torch.zeros_like(batch.input_ids)
    return prompt_masked(batch, zeros, torch.full_like(batch.input_ids, batch.seq_len))


def packed_sft_batch(batch: Batch, samples_per_row: int) -> Batch:
    """``samples_per_row`` samples of (nearly) equal length a row, packed: positions restart at each,
    one document id per sample, each sample's first half its prompt."""
    seq = batch.seq_len
    index = torch.arange(seq)
    document = (index * samples_per_row) // seq
    starts = torch.searchsorted(document, document, right=False)  # the first index of each token's sample
    lengths = torch.bincount(document, minlength=samples_per_row)[document]
    rows = batch.num_rows
    packed = replace(batch, position_ids=(index - starts).expand(rows, -1).contiguous(),
                     document_ids=document.expand(rows, -1).contiguous())
    return prompt_masked(packed, starts.expand(rows, -1), lengths.expand(rows, -1))


def dpo_batch(batch: Batch, first_pair: int) -> Batch:
    """The rows as pairs (row 2i chosen, 2i + 1 rejected), prompts masked, each row naming its pair
    (``first_pair`` + i) as the data pipeline does."""
    pairs = torch.arange(first_pair, first_pair + batch.num_rows // 2, dtype=torch.int64)
    return replace(sft_batch(batch), extras={SAMPLE_INDEX: pairs.repeat_interleave(2)})


# -- memory ------------------------------------------------------------------------------------
def _proc_status() -> dict:
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+)", text, re.M).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


def _trim() -> None:
    """Collect and hand freed heap pages back to the system, so one variant's leftovers neither count
    as the next one's baseline nor serve its allocations without being counted."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """The peak memory of one variant: ``start()`` before it, ``peak()`` after."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated above the variant's start"
        if device.type != "cuda":
            try:
                Path("/proc/self/clear_refs").write_text("5")
                _proc_status()
                self.kind = "peak RSS above the variant's start (high-water mark reset per variant)"
                self.resettable = True
            except (OSError, AttributeError):
                self.kind = "process peak RSS (not resettable here: the maximum so far, not per variant)"
                self.resettable = False
        self.baseline = 0

    def start(self) -> None:
        _trim()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        elif self.resettable:
            Path("/proc/self/clear_refs").write_text("5")
            self.baseline = _proc_status()["VmRSS"]

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        if self.resettable:
            return _proc_status()["VmHWM"] - self.baseline
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# -- the variants ------------------------------------------------------------------------------
def variant_config(cfg, name: str):
    """The config a variant's TrainModule is built from: its objective; DPO's batch in pairs."""
    cfg = copy.deepcopy(cfg)
    cfg.objective.kind = {"pretrain": "lm", "sft": "sft", "sft-packed": "sft"}.get(name, "dpo")
    if cfg.objective.kind == "dpo":
        cfg.objective.reference = name[len("dpo-"):]
        cfg.train.global_batch_size //= 2
        cfg.train.micro_batch_size = max(1, cfg.train.micro_batch_size // 2)
    return cfg


def run_variant(cfg, name: str, windows, device, dtype, memory: PeakMemory, warmup: int, pack: int) -> dict:
    vcfg = variant_config(cfg, name)
    t = vcfg.train
    ctx = ParallelContext.single(device)
    kind = vcfg.objective.kind
    pairs = t.global_batch_size if kind == "dpo" else None
    if name == "pretrain":
        batches = list(windows)
    elif name == "sft":
        batches = [sft_batch(b) for b in windows]
    elif name == "sft-packed":
        batches = [packed_sft_batch(b, pack) for b in windows]
    else:
        batches = [dpo_batch(b, i * pairs) for i, b in enumerate(windows)]

    memory.start()
    module = TrainModule(vcfg, ctx, generator=torch.Generator().manual_seed(t.seed), param_dtype=dtype)
    micro_rows = module.micro_batch_rows
    result = {"objective": kind, "rows": batches[0].num_rows, "micro_rows": micro_rows,
              "tokens_per_step": batches[0].num_rows * batches[0].seq_len,
              "loss_tokens_per_step": batches[0].num_loss_tokens(),
              "param_bytes": parameter_bytes(module.model)}
    reference = None
    if name == "dpo-precompute":
        # What a fresh run's precompute does: the policy, still at its initial weights, scores
        # every pair once; the table is then looked up by each row's sample index.
        synchronize(device)
        start = time.perf_counter()
        scores = [score_rows(module.model, ctx, b, micro_rows).view(-1, 2).numpy() for b in batches]
        synchronize(device)
        scoring_s = time.perf_counter() - start
        reference = PrecomputedReference({"train": np.concatenate(scores)})
        result.update(pairs=pairs, scoring_s=scoring_s, scoring_s_per_pair=scoring_s / (pairs * len(batches)))
    elif name == "dpo-live":
        frozen = reference_model(vcfg, ctx, dtype, None)
        reference = LiveReference(frozen, ctx, micro_rows)
        result.update(pairs=pairs, reference_param_bytes=parameter_bytes(frozen))

    steps, attach_times, first_loss = [], [], None
    for i, batch in enumerate(batches):
        synchronize(device)
        start = time.perf_counter()
        if reference is not None:
            batch = reference.attach(batch, "train")
        synchronize(device)
        attached = time.perf_counter()
        metrics = module.step(batch, cfg.optim.lr)
        synchronize(device)
        end = time.perf_counter()
        if i == 0:
            first_loss = metrics["loss"]
        if i >= warmup:
            steps.append(end - start)
            attach_times.append(attached - start)
    result["peak_memory_bytes"] = memory.peak()
    step_s = statistics.median(steps)
    result.update(step_s=step_s, tokens_per_sec=result["tokens_per_step"] / step_s, first_loss=first_loss)
    if reference is not None:
        result["reference_s"] = statistics.median(attach_times)
    del module, reference
    return result


def measure(cfg, steps: int, warmup: int, pack: int) -> dict:
    device = resolve_device(cfg)
    dtype = param_dtype(cfg, device)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    windows = random_batches(cfg, warmup + steps)  # the same token ids for every variant
    memory = PeakMemory(device)
    names = [n for n in VARIANTS if pack or n != "sft-packed"]
    # A first pass of one step each, discarded: the process's one-off costs (libraries loaded, thread
    # pools, first-use buffers) would otherwise count in whichever variant runs first.
    for name in names:
        run_variant(cfg, name, windows[:1], device, dtype, memory, 0, pack)
    variants = {name: run_variant(cfg, name, windows, device, dtype, memory, warmup, pack) for name in names}
    base = variants["pretrain"]
    for v in variants.values():
        v["tokens_per_sec_ratio"] = v["tokens_per_sec"] / base["tokens_per_sec"]
        v["memory_ratio"] = v["peak_memory_bytes"] / base["peak_memory_bytes"] if base["peak_memory_bytes"] > 0 else None
    t = cfg.train
    return {
        "config": cfg.run.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "precision": "bf16 params, fp32 master" if dtype == torch.bfloat16 else "fp32",
        "total_params": count_parameters(cfg.model)["total"],
        "rows": t.global_batch_size, "seq_len": t.seq_len, "micro_batch_size": t.micro_batch_size,
        "tokens_per_step": t.global_batch_size * t.seq_len,
        "steps": steps, "warmup": warmup, "samples_per_packed_row": pack or None,
        "peak_memory_kind": memory.kind,
        "variants": variants,
    }


def print_table(result: dict) -> None:
    print(f"config {result['config']} on {result['device']} ({result['precision']}), "
          f"{result['total_params'] / 1e6:.1f}M params; {result['rows']} rows x {result['seq_len']} = "
          f"{result['tokens_per_step']:,} tokens/step, median of {result['steps']} steps after {result['warmup']}")
    header = (f"  {'variant':<16} {'step s':>8} {'tokens/s':>10} {'x pretrain':>10} {'peak MiB':>9} "
              f"{'x pretrain':>10} {'loss tok':>9}  notes")
    print(header)
    for name, v in result["variants"].items():
        notes = []
        if name == "sft-packed":
            notes.append(f"{result['samples_per_packed_row']} samples/row")
        if "pairs" in v:
            notes.append(f"{v['pairs']} pairs")
        if "reference_s" in v:
            notes.append(f"reference {v['reference_s']:.3f} s/step")
        if "reference_param_bytes" in v:
            notes.append(f"frozen model {v['reference_param_bytes'] / 2**20:.1f} MiB params")
        if "scoring_s_per_pair" in v:
            notes.append(f"one-off scoring {1e3 * v['scoring_s_per_pair']:.1f} ms/pair ({v['scoring_s']:.2f} s)")
        memory_ratio = f"{v['memory_ratio']:.2f}" if v["memory_ratio"] is not None else "-"
        print(f"  {name:<16} {v['step_s']:>8.3f} {v['tokens_per_sec']:>10,.0f} {v['tokens_per_sec_ratio']:>10.2f} "
              f"{v['peak_memory_bytes'] / 2**20:>9.1f} {memory_ratio:>10} {v['loss_tokens_per_step']:>9,}  "
              + "; ".join(notes))
    print(f"  peak memory: {result['peak_memory_kind']}")


def main(argv=None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("config", help="preset name or YAML file")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first, per variant")
    parser.add_argument("--pack", type=int, default=4, help="samples per row of the packed SFT variant (0: skip it)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args, overrides = parser.parse_known_args(argv)

    def body() -> int:
        if args.steps < 1 or args.warmup < 0 or args.pack < 0:
            raise UsageError("--steps must be >= 1, --warmup and --pack >= 0")
        cfg = load_config(args.config, overrides)
        validate(cfg, check_data=False)
        t = cfg.train
        if args.pack > t.seq_len // 2:
            raise UsageError(f"--pack {args.pack}: at most train.seq_len / 2 = {t.seq_len // 2} samples of "
                             f"two tokens or more fit a row")
        micro_pairs = max(1, t.micro_batch_size // 2)
        if t.global_batch_size % 2 or (t.global_batch_size // 2) % micro_pairs:
            raise UsageError(f"train.global_batch_size {t.global_batch_size} rows: DPO needs an even number, "
                             f"{micro_pairs} pair(s) a micro-batch dividing the pairs")
        result = measure(cfg, args.steps, args.warmup, args.pack)
        if args.json:
            print(json.dumps(result))
        else:
            print_table(result)
        return 0

    return run_tool(PROG, body, {ConfigError: 2, UsageError: 2})


if __name__ == "__main__":
    sys.exit(main())
