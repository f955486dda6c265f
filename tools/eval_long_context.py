#!/usr/bin/env python
"""Long-context evaluation of a megacpm run or checkpoint: the loss by position bucket over held-out
documents, and a passkey-retrieval probe, each with a PNG plot.

  python tools/eval_long_context.py runs/tiny --lengths 128 256 512 --out eval/tiny
  python tools/eval_long_context.py runs/128k/checkpoints/step_5000 --lengths 4096 32768 131072 \\
      --windows 4 --device cuda --out eval/128k

Loss by position (positions.json, positions.png): for each --lengths L, --windows validation
samples of L tokens from the run's own data config (the held-out split; the same documents for a
parent and its branch that keeps its data; ``--data.KEY=VALUE`` overrides read other documents,
e.g. a parent on its branch's long ones), one forward each; every token's cross entropy, averaged
over --buckets equal ranges of positions (train.eval_position_buckets' rule). A model that uses its context has a curve that falls with the position; one
evaluated past the length it was trained for shows where it stops using it (the loss rises again).
Lengths past the training length are allowed: RoPE has no length limit, and with
``model.rope_scaling`` the dynamic-NTK base grows as it does in training.

Passkey retrieval (passkey.json, passkey.png; --passkey): a five-digit key hidden at --depths
(fractions of the context) in filler text of each length, followed by the question; the model
retrieves it when every key token is the argmax of its prediction given what precedes it (teacher
forcing: no sampling). Accuracy over --trials keys per (length, depth). Small models trained on a
few megabytes do not retrieve (a chance-level grid is the expected result on CPU); the probe is for
real checkpoints.

Everything runs in one process (the model in fp32 on the CPU, bf16 on CUDA unless --dtype float32).
Outputs are written to temporary names and renamed.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _entry, when imported from its path

import torch  # noqa: E402

from _entry import OneLineParser, run_tool  # noqa: E402
from megacpm.checkpoint import CheckpointError  # noqa: E402
from megacpm.config import Config, ConfigError  # noqa: E402
from megacpm.config.loader import override_value, set_value, split_overrides  # noqa: E402
from megacpm.data import DataError, build_datasets  # noqa: E402
from megacpm.data.batch import IGNORE_INDEX  # noqa: E402
from megacpm.huggingface import load_pretrained, megacpm_config  # noqa: E402
from megacpm.io.atomic import write_bytes_atomic, write_text_atomic  # noqa: E402
from megacpm.objectives.lm import position_bucket_starts  # noqa: E402

PROG = "eval_long_context"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = " What is the pass key? The pass key is"


class UsageError(Exception):
    pass


# -- loss by position ----------------------------------------------------------------------------
@torch.no_grad()
def token_losses(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 [batch, seq]: each token's cross entropy (0 where ignored), logits a chunk at a time."""
    return model.head_loss(model.hidden(input_ids), labels, IGNORE_INDEX, reduction="none").float()


def bucket_means(losses: torch.Tensor, valid: torch.Tensor, buckets: int) -> List[float]:
    """Mean loss over each of ``buckets`` equal position ranges (train.eval_position_buckets' rule:
    megacpm.objectives.lm.position_bucket_starts)."""
    seq = losses.shape[1]
    edges = [*position_bucket_starts(buckets, seq), seq]
    means = []
    for lo, hi in zip(edges, edges[1:]):
        count = valid[:, lo:hi].sum()
        means.append(float(losses[:, lo:hi].sum() / count) if count else math.nan)
    return means


def position_curves(model, cfg, lengths: List[int], windows: int, buckets: int, device) -> Dict:
    """{length: windows, bucket_loss, mean_loss} over the validation split of ``cfg``'s data."""
    curves = {}
    for length in lengths:
        data = build_datasets(cfg.data, cfg.model.vocab_size, length, cfg.train.seed, warn=lambda line: None)
        available = len(data.valid)
        if available < 1:
            raise UsageError(f"--lengths {length}: the run's validation split has no sample of {length} tokens")
        batch = data.eval_batch(min(windows, available))
        losses, valid = [], []
        for row in range(batch.num_rows):  # one window at a time: the memory of one long sequence
            ids, labels = batch.input_ids[row:row + 1].to(device), batch.labels[row:row + 1].to(device)
            losses.append(token_losses(model, ids, labels).cpu())
            valid.append((labels != IGNORE_INDEX).cpu())
        losses, valid = torch.cat(losses), torch.cat(valid)
        curves[str(length)] = {"windows": batch.num_rows, "bucket_loss": bucket_means(losses, valid, buckets),
                               "mean_loss": float(losses.sum() / valid.sum())}
    return curves


# -- passkey ---------------------------------------------------------------------------------------
def passkey_prompt(tokenizer, length: int, depth: float, key: str):
    """(token ids of filler with the key sentence at ``depth`` and the question, the key's ids) of
    about ``length`` tokens in all."""
    encode = lambda text: tokenizer.encode(text).ids  # noqa: E731
    needle = encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question, answer = encode(QUESTION), encode(" " + key)
    filler_unit = encode(FILLER)
    room = length - len(needle) - len(question) - len(answer)
    if room < 1:
        raise UsageError(f"--lengths {length}: too short for the passkey prompt ({length - room} tokens at least)")
    filler = (filler_unit * (room // len(filler_unit) + 1))[:room]
    split = int(round(depth * room))
    return filler[:split] + needle + filler[split:] + question, answer


@torch.no_grad()
def passkey_grid(model, tokenizer, lengths: List[int], depths: List[float], trials: int, device) -> Dict:
    generator = torch.Generator().manual_seed(0)
    grid = {}
    for length in lengths:
        row = {}
        for depth in depths:
            hits = 0
            for _ in range(trials):
                key = str(int(torch.randint(10_000, 100_000, (1,), generator=generator)))
                prompt, answer = passkey_prompt(tokenizer, length, depth, key)
                ids = torch.tensor([prompt + answer], device=device)
                predicted = model(ids[:, :-1]).argmax(-1)[0, len(prompt) - 1:]
                hits += bool(torch.equal(predicted.cpu(), torch.tensor(answer)))
            row[f"{depth:g}"] = hits / trials
        grid[str(length)] = row
    return grid


# -- plots -----------------------------------------------------------------------------------------
def _save_png(figure, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_bytes_atomic(path, buffer.getvalue())


def plot_positions(curves: Dict, trained_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for length, curve in curves.items():
        buckets = len(curve["bucket_loss"])
        centres = [(i + 0.5) * int(length) / buckets for i in range(buckets)]
        axis.plot(centres, curve["bucket_loss"], marker="o", label=f"{length} tokens")
    axis.axvline(trained_length, color="grey", linestyle=":", label=f"trained length {trained_length}")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("position in the sequence")
    axis.set_ylabel("cross entropy (nats)")
    axis.set_title("held-out loss by position")
    axis.legend(fontsize=8)
    _save_png(figure, path)
    plt.close(figure)


def plot_passkey(grid: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = list(grid), list(next(iter(grid.values())))
    values = [[grid[length][depth] for length in lengths] for depth in depths]
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    image = axis.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
    axis.set_xticks(range(len(lengths)), lengths)
    axis.set_yticks(range(len(depths)), depths)
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("depth of the key")
    axis.set_title("passkey retrieval accuracy")
    figure.colorbar(image, ax=axis)
    _save_png(figure, path)
    plt.close(figure)


def data_config(cfg: Config, data_overrides: List[str]) -> Config:
    """The config whose data the evaluation reads: ``cfg`` with ``--data.KEY=VALUE`` overrides
    (another corpus: a parent evaluated on its long-context branch's documents)."""
    if not data_overrides:
        return cfg
    other = copy.deepcopy(cfg)
    for key, raw in split_overrides(data_overrides):
        if not key.startswith("data."):
            raise UsageError(f"--{key}: only data.* settings may be overridden (the model is the checkpoint's)")
        set_value(other, key, override_value(other, key, raw))
    return other


def evaluate(source: str, out: Path, lengths, windows, buckets, passkey, depths, trials, device, dtype,
             data_overrides: Optional[List[str]] = None) -> Dict:
    _, cfg = megacpm_config(Path(source))
    data_cfg = data_config(cfg, data_overrides or [])
    model = load_pretrained(source, dtype=dtype, device=device)
    report = {"source": str(source), "data_overrides": list(data_overrides or []), "trained_seq_len": cfg.train.seq_len,
              "rope_theta": cfg.model.rope_theta, "rope_scaling": cfg.model.rope_scaling,
              "positions": position_curves(model, data_cfg, lengths, windows, buckets, device)}
    out.mkdir(parents=True, exist_ok=True)
    plot_positions(report["positions"], cfg.train.seq_len, out / "positions.png")
    if passkey:
        data = build_datasets(data_cfg.data, data_cfg.model.vocab_size, min(lengths), data_cfg.train.seed,
                              warn=lambda line: None)
        if data.tokenizer is None:
            raise UsageError("--passkey needs the run's tokenizer (a pre-tokenized corpus has none)")
        report["passkey"] = passkey_grid(model, data.tokenizer, lengths, depths, trials, device)
        plot_passkey(report["passkey"], out / "passkey.png")
    write_text_atomic(out / "report.json", json.dumps(report, indent=1))
    return report


def main(argv=None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("source", help="a megacpm run directory (its latest checkpoint) or checkpoint directory")
    parser.add_argument("--out", required=True, help="directory for report.json and the plots")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--windows", type=int, default=8, help="validation samples per length")
    parser.add_argument("--buckets", type=int, default=8, help="position buckets per length")
    parser.add_argument("--passkey", action="store_true", help="also run the passkey-retrieval probe")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--trials", type=int, default=4, help="keys per (length, depth)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    args, data_overrides = parser.parse_known_args(argv)  # the rest: --data.KEY=VALUE (data_config checks)

    def body() -> int:
        if min(args.lengths) < 2 or args.windows < 1 or args.buckets < 1 or args.trials < 1:
            raise UsageError("--lengths must be >= 2, --windows, --buckets and --trials >= 1")
        if any(not 0.0 <= d <= 1.0 for d in args.depths):
            raise UsageError("--depths are fractions of the context, in [0, 1]")
        device = torch.device(args.device)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
            args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
        report = evaluate(args.source, Path(args.out), sorted(set(args.lengths)), args.windows, args.buckets,
                          args.passkey, args.depths, args.trials, device, dtype, data_overrides)
        for length, curve in report["positions"].items():
            print(f"{length:>7} tokens: mean loss {curve['mean_loss']:.4f}; by position "
                  + " ".join(f"{v:.3f}" for v in curve["bucket_loss"]))
        for length, row in report.get("passkey", {}).items():
            print(f"{length:>7} tokens: passkey accuracy by depth " + " ".join(f"{d}:{a:.2f}" for d, a in row.items()))
        print(f"wrote {Path(args.out) / 'report.json'}")
        return 0

    return run_tool(PROG, body, {UsageError: 2, ConfigError: 2, CheckpointError: 1, DataError: 1})


if __name__ == "__main__":
    sys.exit(main())
