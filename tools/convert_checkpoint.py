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
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megacpm.checkpoint import CheckpointError, save_weights  # noqa: E402
from megacpm.config import Config, ConfigError, dump_yaml, load_config  # noqa: E402
from megacpm.config.validate import validate_model, validate_parallel  # noqa: E402
from megacpm.huggingface import DTYPES, model_config_from_hf, read_hf_weights, read_megacpm, write_hf_directory  # noqa: E402
from megacpm.io.atomic import atomic_directory  # noqa: E402
from megacpm.io.run_dir import CONFIG_FILE  # noqa: E402


def _parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    for unit, scale in units.items():
        if text.upper().endswith(unit):
            return int(float(text[:-len(unit)]) * scale)
    return int(text)


def hf_to_megacpm(args) -> str:
    model_cfg = model_config_from_hf(Path(args.input))
    cfg = load_config(args.config) if args.config else Config()
    cfg.model = model_cfg
    cfg.parallel.tp, cfg.parallel.pp = args.tp, args.pp
    validate_model(cfg)
    validate_parallel(cfg, world_size=args.tp * args.pp)
    output = Path(args.output)
    if output.exists():
        raise CheckpointError(f"{output}: already exists")
    weights = read_hf_weights(Path(args.input), model_cfg)
    cfg.run.dir, cfg.run.name = str(output), output.name
    with atomic_directory(output) as tmp:
        save_weights(tmp, cfg, weights)
        (tmp / CONFIG_FILE).write_text(dump_yaml(cfg))
    params = sum(t.numel() for t in weights.values())
    return (f"wrote {output} ({params:,} parameters, step 0, weights only: training resumes with a fresh "
            f"optimizer); loads under any layout, e.g. tp {args.tp} x pp {args.pp}")


def megacpm_to_hf(args) -> str:
    cfg, weights = read_megacpm(Path(args.input))
    directory = write_hf_directory(Path(args.output), cfg.model, weights, DTYPES[args.dtype], llama=args.llama_format,
                                   max_shard_bytes=_parse_size(args.max_shard_size))
    kind = "Llama-format (muP folded into the weights)" if args.llama_format else "MiniCPM"
    return f"wrote {directory}: {kind} config.json + safetensors ({args.dtype})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
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
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (-> hf)")
    args = parser.parse_args(argv)
    if (args.source, args.target) not in (("hf", "megacpm"), ("megacpm", "hf")):
        parser.error("convert either --from hf --to megacpm or --from megacpm --to hf")
    try:
        message = hf_to_megacpm(args) if args.source == "hf" else megacpm_to_hf(args)
    except ConfigError as exc:
        print(f"convert_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"convert_checkpoint: error: {exc}", file=sys.stderr)
        return 1
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
