#!/usr/bin/env python
"""Convert checkpoints between Hugging Face MiniCPM directories and megacpm runs.

  # Hugging Face -> megacpm: a run directory with a weights-only checkpoint at step 0
  python tools/convert_checkpoint.py --from hf --to megacpm --input MiniCPM-2B --output runs/cpt \\
      [--tp 2 --pp 2] [--config minicpm-2.4b]
  torchrun --nproc_per_node=4 -m megacpm train runs/cpt --parallel.tp=2 --parallel.pp=2 ...   # continue training

  # megacpm -> Hugging Face (a run directory means its latest checkpoint)
  python tools/convert_checkpoint.py --from megacpm --to hf --input runs/cpt --output hf-out [--dtype bf16]
  python tools/convert_checkpoint.py --from megacpm --to hf --input runs/cpt --output llama-out --llama-format

megacpm checkpoints are in model space (single-process names and shapes): the one written here loads
under any tp/pp/vpp/dp; --tp/--pp only set the layout recorded in the run's config and check that the
model can be split that way. The MiniCPM output directory holds config.json and safetensors; its
config names the remote code (modeling_minicpm.py, configuration_minicpm.py) that the published
MiniCPM releases ship: copy those files in to load it with trust_remote_code. --llama-format folds
the muP multipliers into the weights for transformers' own LlamaForCausalLM.

MiniCPM-MoE (config.json's num_experts, num_experts_per_tok) converts both ways too: Hugging Face's
one tensor per expert (model.layers.L.mlp.experts.E.w1/w3/w2.weight) becomes megacpm's stacked
layers.L.mlp.w1/w3/w2 and back, bit-exact. It has no Llama format (Llama has no experts): refused.

Only MiniCPM directories convert (config.json's model_type 'minicpm', with its muP fields scale_emb,
dim_model_base, scale_depth): another model's config is refused, not converted with default
multipliers. The output is written under a temporary name and renamed when complete, so a failure,
Ctrl-C or SIGTERM leaves no output and no temporary. Every failure is one line,
``convert_checkpoint: error: PATH: cause``; exit status 1 for an unusable input or a write error,
2 for bad arguments, 130 / 143 when interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _entry, when imported from its path

# Only light modules here (no torch): a bad argument fails in a fraction of a second. The
# conversions import the checkpoint and model code (torch) in the functions below.
from _entry import OneLineParser, run_tool  # noqa: E402
from megacpm.config import Config, ConfigError, dump_yaml, load_config  # noqa: E402
from megacpm.config.validate import validate_model, validate_parallel  # noqa: E402
from megacpm.io.atomic import atomic_directory  # noqa: E402
from megacpm.io.errors import EntryPointError  # noqa: E402
from megacpm.io.run_dir import CONFIG_FILE  # noqa: E402

PROG = "convert_checkpoint"


class UsageError(Exception):
    """A bad argument: one line, exit status 2, nothing written."""


def _parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    try:
        for unit, scale in units.items():
            if text.upper().endswith(unit):
                size = int(float(text[:-len(unit)]) * scale)
                break
        else:
            size = int(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 5GB, 500MB, 1048576)") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return size


def check_paths(args) -> None:
    """--input an existing directory; --output new, under directories (created if missing)."""
    source = Path(args.input)
    if not source.exists():
        raise UsageError(f"--input: {source}: no such directory")
    if not source.is_dir():
        raise UsageError(f"--input: {source}: not a directory")
    output = Path(args.output)
    if os.path.lexists(output):
        raise UsageError(f"--output: {output}: already exists (the converter writes a new directory)")
    ancestor = output.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"--output: {ancestor} is a file, not a directory")
    for option in ("tp", "pp"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option}: must be >= 1, got {getattr(args, option)}")


def hf_to_megacpm(args) -> str:
    from megacpm.checkpoint import save_weights
    from megacpm.huggingface import CONFIG, ConversionError, model_config_from_hf, read_hf_weights

    config_path = Path(args.input) / CONFIG
    model_cfg = model_config_from_hf(Path(args.input))
    cfg = load_config(args.config) if args.config else Config()
    cfg.model = model_cfg
    cfg.parallel.tp, cfg.parallel.pp = args.tp, args.pp
    try:
        validate_model(cfg)
    except ConfigError as exc:
        raise ConversionError(f"{config_path}: {exc}") from None
    try:
        validate_parallel(cfg, world_size=args.tp * args.pp)
    except ConfigError as exc:
        raise UsageError(f"--tp {args.tp} --pp {args.pp}: {exc} (the model of {config_path})") from None
    output = Path(args.output)
    weights = read_hf_weights(Path(args.input), model_cfg)
    cfg.run.dir, cfg.run.name = str(output), output.name
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(output) as tmp:
        save_weights(tmp, cfg, weights)
        (tmp / CONFIG_FILE).write_text(dump_yaml(cfg))
    params = sum(t.numel() for t in weights.values())
    return (f"wrote {output} ({params:,} parameters, step 0, weights only: training resumes with a fresh "
            f"optimizer); loads under any layout, e.g. tp {args.tp} x pp {args.pp}")


def megacpm_to_hf(args) -> str:
    from megacpm.checkpoint.manager import read_router_biases
    from megacpm.huggingface import DTYPES, megacpm_config, read_megacpm, refuse_llama_moe, write_hf_directory
    from megacpm.io.errors import print_warning

    checkpoint, cfg = megacpm_config(Path(args.input))
    refuse_llama_moe(cfg.model, args.llama_format, checkpoint / CONFIG_FILE)  # before reading any weights
    cfg, weights = read_megacpm(Path(args.input))
    if any(bias.any() for bias in read_router_biases(checkpoint, cfg.model).values()):
        print_warning(f"{checkpoint}: the routers' auxiliary-loss-free balancing biases are not part of the "
                      "Hugging Face MiniCPM-MoE layout; the exported model routes without them")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    directory = write_hf_directory(Path(args.output), cfg.model, weights, DTYPES[args.dtype], llama=args.llama_format,
                                   max_shard_bytes=args.max_shard_size)
    kind = "Llama-format (muP folded into the weights)" if args.llama_format else "MiniCPM"
    return f"wrote {directory}: {kind} config.json + safetensors ({args.dtype})"


def main(argv=None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("--from", dest="source", choices=("hf", "megacpm"), required=True)
    parser.add_argument("--to", dest="target", choices=("hf", "megacpm"), required=True)
    parser.add_argument("--input", required=True, help="HF directory, or megacpm run / checkpoint directory")
    parser.add_argument("--output", required=True, help="the directory to create (must not exist)")
    parser.add_argument("--tp", type=int, default=1, help="layout to record and check (hf -> megacpm)")
    parser.add_argument("--pp", type=int, default=1, help="layout to record and check (hf -> megacpm)")
    parser.add_argument("--config", default=None,
                        help="preset or YAML whose non-model sections the new run takes (hf -> megacpm)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights dtype (-> hf)")
    parser.add_argument("--llama-format", action="store_true", help="export a LlamaForCausalLM directory (-> hf)")
    parser.add_argument("--max-shard-size", type=_parse_size, default="5GB", help="safetensors shard size (-> hf)")
    args = parser.parse_args(argv)
    if (args.source, args.target) not in (("hf", "megacpm"), ("megacpm", "hf")):
        parser.error("convert either --from hf --to megacpm or --from megacpm --to hf")

    def body() -> int:
        check_paths(args)
        from megacpm.checkpoint import CheckpointError

        try:
            print(hf_to_megacpm(args) if args.source == "hf" else megacpm_to_hf(args))
        except CheckpointError as exc:  # the checkpoint or Hugging Face directory at fault: exit 1
            raise EntryPointError(str(exc)) from None
        return 0

    # The output is written under a temporary name and renamed when complete: SIGTERM (like Ctrl-C or
    # any failure) unwinds through atomic_directory, which removes the temporary: no output at all.
    return run_tool(PROG, body, {UsageError: 2, ConfigError: 2},
                    interrupted="interrupted; no output written",
                    sigterm=True)


if __name__ == "__main__":
    sys.exit(main())
