#!/usr/bin/env python
"""Checkpoint save and load throughput, next to the disk's own sequential write and read speed.

  python tools/bench_checkpoint.py                          # ~80M params: a ~1 GB checkpoint
  python tools/bench_checkpoint.py --params-millions 250    # ~1 GB of fp32 weights, a 3 GB checkpoint
  python tools/bench_checkpoint.py --params-millions 50 --repeats 5
  python tools/bench_checkpoint.py --dir /mnt/fast --json   # on another filesystem, as JSON
  python tools/bench_checkpoint.py --model.num_hidden_layers=8   # any config override, applied last

One process builds a TrainModule (ParallelContext.single(), fp32) of a MiniCPM sized to about
``--params-millions`` million parameters and, in each repeat, measures side by side:

  checkpoint save   megacpm.checkpoint.save_checkpoint: the fp32 master weights and both AdamW
                    moments (12 bytes per parameter) through torch.distributed.checkpoint, RNG
                    states, trainer_state.json, config.yaml; fsynced, renamed, ``latest`` rewritten
  disk write        one plain file of exactly the checkpoint's total size: f.write of a 64 MiB
                    buffer, flush, os.fsync
  disk read         the plain file read back (readinto a 64 MiB buffer)
  checkpoint load   megacpm.checkpoint.load_checkpoint of ``latest`` into the same TrainModule
  background save   save_checkpoint_async (checkpoint.async_save): how long the training loop is
                    held (the host copy), the time to the published checkpoint, and the time of a
                    small training step alone and while the write runs

Reads happen twice. "warm": right after the writes, with both files still in the page cache (the
same cache state for both, so the ratio compares software paths, not the device). "cold": after
posix_fadvise(POSIX_FADV_DONTNEED) on this benchmark's own files only (never a system-wide cache
drop), so both read from the device. A clean page the kernel refuses to drop stays cached, for both
alike.

Each repeat writes a fresh checkpoint and a fresh plain file and deletes both before the next one;
the median of the repeats is reported. GB/s are decimal (1e9 bytes per second). Everything goes into
a new temporary directory (under --dir, default the system temp dir, /tmp), removed at the end;
--keep leaves it with the last repeat's checkpoint (run/checkpoints/) and plain file.

The default size is 80M parameters (a ~1 GB checkpoint), not 250M (1 GB of weights, a 3 GB
checkpoint): on the 2-core development VM, building the 250M model takes only ~7 s, but each repeat
then writes 2 x 3 GB and reads them twice, and the whole run took 1.5 to 2 minutes; at 80M it takes
30 s when the machine is quiet, up to 75 s when other work shares its cores. The vocabulary is
fixed at 32768, so the smallest model is ~9M parameters (one layer of hidden 256). Timings on a
shared virtual machine are noisy: the table shows the spread (min-max) next to the median.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megacpm.checkpoint import (TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint,  # noqa: E402
                                save_checkpoint_async)
from megacpm.config import ConfigError, load_config, validate  # noqa: E402
from megacpm.model import count_parameters  # noqa: E402
from megacpm.parallel.context import ParallelContext  # noqa: E402
from megacpm.data.batch import Batch  # noqa: E402
from megacpm.train.train_module import TrainModule  # noqa: E402

CHUNK = 64 << 20  # bytes per write / readinto call of the plain file
VOCAB = 32768
HIDDEN_SIZES = (256, 512, 1024, 2048, 4096, 8192)
OPERATIONS = ("disk_write", "checkpoint_save", "disk_read_warm", "checkpoint_load_warm",
              "disk_read_cold", "checkpoint_load_cold")
LABELS = {
    "disk_write": "disk write (f.write + fsync)",
    "checkpoint_save": "checkpoint save",
    "disk_read_warm": "disk read, warm cache",
    "checkpoint_load_warm": "checkpoint load, warm cache",
    "disk_read_cold": "disk read, cold (fadvise)",
    "checkpoint_load_cold": "checkpoint load, cold (fadvise)",
}


# -- the model's shape ---------------------------------------------------------------------------
def _shape(hidden: int, layers: int) -> dict:
    # The MiniCPM family's proportions: SwiGLU width 2.75 x hidden, 64-wide heads, 4 query heads per kv head.
    return {"hidden_size": hidden, "intermediate_size": int(2.75 * hidden), "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64, "num_key_value_heads": max(1, hidden // 256),
            "vocab_size": VOCAB}


def _count(base_cfg, shape: dict) -> int:
    for key, value in shape.items():
        setattr(base_cfg.model, key, value)
    return count_parameters(base_cfg.model)["total"]


def size_model(cfg, params_millions: float) -> dict:
    """Model overrides giving about ``params_millions`` million parameters: the widest of
    HIDDEN_SIZES that still has at least as many layers as attention heads (hidden 1024 x 19 layers
    for 250M), counted on the meta device."""
    target = params_millions * 1e6
    chosen = None
    for hidden in HIDDEN_SIZES:
        one, two = _count(cfg, _shape(hidden, 1)), _count(cfg, _shape(hidden, 2))
        per_layer, base = two - one, 2 * one - two
        layers = max(1, round((target - base) / per_layer))
        if chosen is None or layers >= hidden // 64:
            chosen = _shape(hidden, layers)
    return chosen


# -- file helpers --------------------------------------------------------------------------------
def tree_files(root: Path) -> list:
    return [Path(d) / name for d, _, names in os.walk(root) for name in names]


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in tree_files(root))


def evict(paths) -> None:
    """Drop these files' clean pages from the page cache (this process's own files only)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_plain(path: Path, nbytes: int, buffer: bytes) -> None:
    view = memoryview(buffer)
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(left, len(view))
            f.write(view[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def read_plain(path: Path, buffer: bytearray) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while (n := f.readinto(buffer)) > 0:
            total += n
    return total


def filesystem_of(path: Path) -> str:
    """'fstype on device' of the mount holding path (from /proc/mounts), or '?'."""
    path, best = str(path.resolve()), ("", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[0]):
                best = (mount, f"{fstype} on {device}")
    except OSError:
        pass
    return best[1]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# -- the benchmark -------------------------------------------------------------------------------
def measure(cfg, work: Path, repeats: int, log, keep: bool = False) -> dict:
    counts = count_parameters(cfg.model)
    log(f"building the model: {counts['total'] / 1e6:.1f}M parameters ...")
    build_s, step = timed(lambda: TrainModule(cfg, ParallelContext.single(),
                                              generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():  # moments as after training (materialised, not calloc'd zero pages)
        for opt in step.optimizer.adamw.values():
            opt.exp_avg.copy_(opt.master).mul_(0.1)
            opt.exp_avg_sq.copy_(opt.master).square_()
    params = step.model.params_by_name()
    probe = {name: params[name].detach().clone() for name in (next(iter(params)), list(params)[-1])}

    run_dir, plain = work / "run", work / "plain.bin"
    write_buffer = os.urandom(CHUNK)
    read_buffer = bytearray(CHUNK)
    seconds = {op: [] for op in OPERATIONS}
    sizes = {}
    for k in range(1, repeats + 1):
        state = TrainerState(step=k, optimizer_steps=step.optimizer_steps)
        t, path = timed(lambda: save_checkpoint(run_dir, cfg, step, state))
        seconds["checkpoint_save"].append(t)
        ckpt_bytes = tree_bytes(path)
        sizes["checkpoint"] = ckpt_bytes
        t, _ = timed(lambda: write_plain(plain, ckpt_bytes, write_buffer))
        seconds["disk_write"].append(t)
        for cache in ("warm", "cold"):
            if cache == "cold":
                evict([plain, *tree_files(path)])
            t, nread = timed(lambda: read_plain(plain, read_buffer))
            assert nread == ckpt_bytes, (nread, ckpt_bytes)
            seconds[f"disk_read_{cache}"].append(t)
            for tensor in params.values():  # the load must bring the values back
                tensor.data.zero_()
            t, loaded = timed(lambda: load_checkpoint(latest_checkpoint(run_dir), cfg, step))
            seconds[f"checkpoint_load_{cache}"].append(t)
            assert loaded.step == k, loaded
            for name, expected in probe.items():
                assert torch.equal(params[name], expected), f"{name}: loaded values differ from the saved ones"
        log(f"repeat {k}/{repeats}: " + ", ".join(f"{op} {seconds[op][-1]:.2f} s" for op in OPERATIONS))
        if not (keep and k == repeats):
            plain.unlink()
            shutil.rmtree(path)

    background = measure_background_save(cfg, step, work / "run-async", repeats, log)
    payload = 12 * counts["total"]
    result = {
        "background_save": background,
        "params": counts["total"],
        "model": {key: getattr(cfg.model, key) for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                           "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "tensor_bytes": payload,
        "checkpoint_bytes": sizes["checkpoint"],
        "model_build_s": build_s,
        "repeats": repeats,
        "dir": str(work),
        "filesystem": filesystem_of(work),
        "cpu_threads": torch.get_num_threads(),
        "cache": ("warm: files just written and fsynced, read with both still in the page cache; cold: after "
                  "posix_fadvise(POSIX_FADV_DONTNEED) on this benchmark's own files (no system-wide drop)"),
    }
    for op in OPERATIONS:
        median = statistics.median(seconds[op])
        result[op] = {"bytes": sizes["checkpoint"], "seconds": median, "GBps": sizes["checkpoint"] / median / 1e9,
                      "all_seconds": seconds[op]}
    result["ratios"] = {
        "checkpoint_save_GBps / disk_write_GBps": result["checkpoint_save"]["GBps"] / result["disk_write"]["GBps"],
        "checkpoint_load_GBps / disk_read_GBps (warm)":
            result["checkpoint_load_warm"]["GBps"] / result["disk_read_warm"]["GBps"],
        "checkpoint_load_GBps / disk_read_GBps (cold)":
            result["checkpoint_load_cold"]["GBps"] / result["disk_read_cold"]["GBps"],
    }
    return result


def measure_background_save(cfg, step, run_dir: Path, repeats: int, log) -> dict:
    """checkpoint.async_save: how long the training loop is held (the host copy), how long the
    background write takes, and how much the steps taken meanwhile slow down (they share the CPU
    and memory bandwidth with the writer)."""
    batch = Batch.from_tokens(torch.randint(0, cfg.model.vocab_size, (1, 65), generator=torch.Generator().manual_seed(0)))
    step.step(batch, 0.0)  # warm-up
    baseline = [timed(lambda: step.step(batch, 0.0))[0] for _ in range(3)]
    stalls, totals, during = [], [], []
    for k in range(1, repeats + 1):
        start = time.perf_counter()
        pending = save_checkpoint_async(run_dir, cfg, step, TrainerState(step=k, optimizer_steps=step.optimizer_steps))
        stalls.append(time.perf_counter() - start)
        while not pending.done():
            during.append(timed(lambda: step.step(batch, 0.0))[0])
        pending.finish()
        totals.append(time.perf_counter() - start)
        log(f"background save {k}/{repeats}: loop held {stalls[-1]:.2f} s, written in {totals[-1]:.2f} s, "
            f"{len(during)} steps so far alongside")
    shutil.rmtree(run_dir, ignore_errors=True)
    step_s = statistics.median(baseline)
    return {"stall_s": statistics.median(stalls), "total_s": statistics.median(totals),
            "step_s": step_s, "step_s_during_write": statistics.median(during) if during else None,
            "steps_during_write": len(during), "all_stall_s": stalls, "all_total_s": totals}


def print_table(r: dict) -> None:
    m = r["model"]
    print(f"model  {r['params'] / 1e6:.1f}M params fp32 ({r['params']:,}): hidden {m['hidden_size']}, "
          f"{m['num_hidden_layers']} layers, ffn {m['intermediate_size']}, heads {m['num_attention_heads']}/"
          f"{m['num_key_value_heads']}, vocab {m['vocab_size']}; built in {r['model_build_s']:.1f} s")
    print(f"bytes  {r['tensor_bytes']:,} of tensors (weights + 2 AdamW moments, 12 B/param); "
          f"checkpoint files total {r['checkpoint_bytes']:,}")
    print(f"where  {r['dir']} ({r['filesystem']}); median of {r['repeats']}; GB = 1e9 bytes")
    print(f"cache  {r['cache']}")
    print()
    print(f"{'operation':<33} {'bytes':>15} {'seconds':>8} {'GB/s':>7}  {'min-max s':>12}")
    for op in OPERATIONS:
        row = r[op]
        spread = f"{min(row['all_seconds']):.2f}-{max(row['all_seconds']):.2f}"
        print(f"{LABELS[op]:<33} {row['bytes']:>15,} {row['seconds']:>8.2f} {row['GBps']:>7.3f}  {spread:>12}")
    print()
    for name, value in r["ratios"].items():
        print(f"{name:<45} {value:.2f}")
    b = r["background_save"]
    print()
    print(f"background save (checkpoint.async_save): the loop is held {b['stall_s']:.2f} s "
          f"({b['stall_s'] / r['checkpoint_save']['seconds']:.2f} x the synchronous save's "
          f"{r['checkpoint_save']['seconds']:.2f} s); written in {b['total_s']:.2f} s")
    if b["step_s_during_write"] is not None:
        print(f"  a training step (1 x 64 tokens) takes {b['step_s']:.3f} s alone, {b['step_s_during_write']:.3f} s "
              f"while the write runs ({b['steps_during_write']} steps measured)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--params-millions", type=float, default=80.0,
                        help="model size in millions of parameters (default 80: a ~1 GB checkpoint; "
                             "250 gives ~1 GB of fp32 weights, a 3 GB checkpoint)")
    parser.add_argument("--dir", default=None,
                        help="where the files go: a new temporary directory is made inside it (default: /tmp)")
    parser.add_argument("--repeats", type=int, default=3, help="measured repeats, median reported (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory with the last repeat's checkpoint and plain file")
    args, overrides = parser.parse_known_args(argv)
    if args.params_millions <= 0 or args.repeats < 1:
        parser.error("--params-millions must be > 0 and --repeats >= 1")
    try:
        # The sizing first, then the command line's overrides on top of it (they win).
        shape = size_model(load_config("tiny"), args.params_millions)
        cfg = load_config("tiny", [f"--model.{key}={value}" for key, value in shape.items()] + overrides)
        validate(cfg, check_data=False)
    except ConfigError as exc:
        print(f"bench_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    if args.dir is not None:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="megacpm-bench-ckpt-", dir=args.dir))
    log = (lambda text: print(text, file=sys.stderr, flush=True)) if args.json else (lambda text: print(text, flush=True))
    try:
        result = measure(cfg, work, args.repeats, log, keep=args.keep)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        print()
        print_table(result)
        if args.keep:
            print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
