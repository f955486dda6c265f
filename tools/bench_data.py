#!/usr/bin/env python
"""Data-pipeline benchmarks, side by side in one run:

  python tools/bench_data.py                      # 1B-token sample index, reads, mixture order
  python tools/bench_data.py --tokens 1e8 --json

- sample index: building the GPT sample index (megacpm.data.sample_index) for ``--tokens`` tokens of
  synthetic documents (lengths drawn from a log-normal around 1,000 tokens), C++ against numpy;
- mixture order: the blending order (megacpm.data.blending) for ``--blend-samples`` samples of a
  3-dataset mixture, C++ against the numpy reference (timed on a prefix and scaled: the reference
  is a Python loop);
- random reads: samples of seq_len + 1 tokens read at random positions from an indexed dataset
  (megacpm.data.IndexedDataset, memory-mapped) of ``--read-tokens`` tokens written to a temporary
  directory, per second.

Preprocessing throughput is printed by tools/preprocess_data.py itself (tokens/s on its last line).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from megacpm.data import IndexedDataset, IndexedDatasetWriter  # noqa: E402
from megacpm.data.blending import (build_blending_indices, build_blending_indices_numpy,  # noqa: E402
                                   has_cpp_blending)
from megacpm.data.sample_index import build_sample_idx, build_sample_idx_numpy, has_cpp_extension  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def synthetic_lengths(tokens: int, rng: np.random.Generator) -> np.ndarray:
    lengths = np.maximum(1, rng.lognormal(mean=np.log(1000), sigma=1.0, size=int(tokens / 1000 * 1.3))).astype(np.int32)
    total = np.cumsum(lengths, dtype=np.int64)
    return lengths[: int(np.searchsorted(total, tokens)) + 1]


def bench_sample_index(tokens: int, seq_len: int, rng) -> dict:
    lengths = synthetic_lengths(tokens, rng)
    order = rng.permutation(len(lengths)).astype(np.int64)
    numpy_s, reference = timed(lambda: build_sample_idx_numpy(lengths, order, seq_len))
    cpp_s, built = timed(lambda: build_sample_idx(lengths, order, seq_len))
    assert np.array_equal(reference, built)
    return {"tokens": int(lengths.sum(dtype=np.int64)), "documents": len(lengths), "samples": len(built) - 1,
            "numpy_s": numpy_s, "cpp_s": cpp_s if has_cpp_extension() else None,
            "speedup": numpy_s / cpp_s if has_cpp_extension() else None}


def bench_blending(samples: int, prefix: int) -> dict:
    weights = [0.5, 0.3, 0.2]
    cpp_s, built = timed(lambda: build_blending_indices(weights, samples))
    numpy_s, reference = timed(lambda: build_blending_indices_numpy(weights, prefix))
    assert np.array_equal(built[0][:prefix], reference[0])
    numpy_full_s = numpy_s * samples / prefix
    return {"samples": samples, "cpp_s": cpp_s if has_cpp_blending() else None,
            "numpy_s_estimated": numpy_full_s, "numpy_prefix": prefix,
            "speedup": numpy_full_s / cpp_s if has_cpp_blending() else None}


def bench_reads(tokens: int, seq_len: int, reads: int, rng, directory: Path) -> dict:
    prefix = directory / "bench"
    lengths = synthetic_lengths(tokens, rng)
    with IndexedDatasetWriter(prefix, vocab_size=32768) as writer:
        for length in lengths:
            writer.add_sequences([rng.integers(0, 32768, size=int(length), dtype=np.int64)])
            writer.end_document()
    dataset = IndexedDataset(prefix)
    starts = np.concatenate([[0], np.cumsum(dataset.sequence_lengths, dtype=np.int64)])
    total = int(starts[-1])
    positions = rng.integers(0, total - seq_len - 1, size=reads)

    def read_all() -> int:
        checksum = 0
        for position in positions:  # one sample: seq_len + 1 tokens, possibly across documents
            doc = int(np.searchsorted(starts, position, side="right")) - 1
            offset, need, parts = int(position - starts[doc]), seq_len + 1, []
            while need > 0:
                part = dataset.get(doc, offset=offset, length=min(need, int(dataset.sequence_lengths[doc]) - offset))
                parts.append(part)
                need -= len(part)
                doc, offset = doc + 1, 0
            checksum += int(np.concatenate(parts)[0])
        return checksum

    seconds, _ = timed(read_all)
    return {"tokens": total, "reads": reads, "seq_len": seq_len, "reads_per_s": reads / seconds,
            "tokens_per_s": reads * (seq_len + 1) / seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--tokens", type=float, default=1e9, help="tokens of the sample-index benchmark (default 1e9)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--blend-samples", type=int, default=10_000_000)
    parser.add_argument("--read-tokens", type=float, default=5e7, help="size of the indexed dataset read at random")
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    result = {"sample_index": bench_sample_index(int(args.tokens), args.seq_len, rng),
              "blending": bench_blending(args.blend_samples, min(args.blend_samples, 100_000))}
    with tempfile.TemporaryDirectory(prefix="megacpm-bench-data-") as directory:
        result["random_reads"] = bench_reads(int(args.read_tokens), args.seq_len, args.reads, rng, Path(directory))
    if args.json:
        print(json.dumps(result))
        return 0
    s, b, r = result["sample_index"], result["blending"], result["random_reads"]
    print(f"sample index: {s['tokens']:,} tokens, {s['documents']:,} documents, {s['samples']:,} samples of {args.seq_len}")
    print(f"  numpy {s['numpy_s']:.2f} s" + (f", C++ {s['cpp_s']:.2f} s: {s['speedup']:.1f}x" if s["cpp_s"] else ", no C++ extension"))
    print(f"mixture order: {b['samples']:,} samples of 3 datasets")
    print(f"  numpy ~{b['numpy_s_estimated']:.1f} s (timed on {b['numpy_prefix']:,}, scaled)"
          + (f", C++ {b['cpp_s']:.2f} s: {b['speedup']:.0f}x" if b["cpp_s"] else ", no C++ extension"))
    print(f"random reads: {r['reads_per_s']:,.0f} samples/s ({r['tokens_per_s'] / 1e6:.1f} M tokens/s) of "
          f"{args.seq_len + 1} tokens from a {r['tokens']:,}-token memory-mapped indexed dataset")
    return 0


if __name__ == "__main__":
    sys.exit(main())
