"""Hugging Face interop: MiniCPM directories in and out, the Llama-format export, load_pretrained.

A Hugging Face MiniCPM directory is config.json plus weights (``model.safetensors``,
``pytorch_model.bin``, or either sharded with its ``*.index.json``), tensors named as megacpm names
them with a ``model.`` prefix (``lm_head.weight`` without it; absent when the embedding is tied).
The muP multipliers live in config.json (scale_emb, scale_depth, dim_model_base), so a MiniCPM
directory holds the very tensors megacpm trains: conversion is renaming, bit-exact both ways.

MiniCPM-MoE (config.json's ``num_experts`` > 0, with ``num_experts_per_tok``) stores each layer's
router as ``model.layers.L.mlp.gate.weight`` [E, hidden], as megacpm does, and its experts one tensor
each, ``model.layers.L.mlp.experts.e.{w1,w3,w2}.weight`` (gate [I, H], up [I, H], down [H, I]); megacpm
stacks them, ``layers.L.mlp.{w1,w3,w2}`` [E, ...]. Reading stacks them, writing splits them again
(``expert_names``, the one home of that mapping): still bit-exact both ways.

The Llama format folds the multipliers into the weights for code that knows nothing of muP
(transformers' LlamaForCausalLM): embedding x scale_emb; o_proj and down_proj x scale_depth/sqrt(L);
an LM head / (hidden_size / dim_model_base), untied (the tied embedding cannot carry both factors).
It has no experts: a mixture-of-experts model is refused.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from megacpm.checkpoint.branch import resolve_checkpoint
from megacpm.checkpoint.manager import CheckpointError, read_router_biases, read_weights
from megacpm.config import Config, ConfigError, ModelConfig, load_config
from megacpm.config.loader import config_from_dict
from megacpm.io.atomic import atomic_directory
from megacpm.io.errors import describe_decode_error, describe_os_error
from megacpm.io.run_dir import CONFIG_FILE
from megacpm.model import MiniCPM
from megacpm.model.params import parameter_shapes

HF_PREFIX = "model."
CONFIG = "config.json"
# ModelConfig fields with the same name and meaning in a Hugging Face MiniCPM config.json.
SHARED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling",
                 "rms_norm_eps", "tie_word_embeddings", "attention_dropout", "scale_emb", "scale_depth",
                 "dim_model_base", "initializer_range")
MINICPM_AUTO_MAP = {"AutoConfig": "configuration_minicpm.MiniCPMConfig",
                    "AutoModel": "modeling_minicpm.MiniCPMModel",
                    "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"}
DEFAULT_SHARD_BYTES = 5 * 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ConversionError(CheckpointError):
    """A directory that cannot be converted: the message names the file or tensor."""


# -- config.json -----------------------------------------------------------------------------------
def is_hf_directory(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


# MiniCPM's muP multipliers: a config.json without them is not a MiniCPM (Llama, a Llama-format
# export of megacpm, ...), and converting it with megacpm's defaults would train another function.
MUP_FIELDS = ("scale_emb", "dim_model_base", "scale_depth")
REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                   *MUP_FIELDS)
INT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "max_position_embeddings", "dim_model_base")
FLOAT_FIELDS = ("rope_theta", "rms_norm_eps", "attention_dropout", "scale_emb", "scale_depth", "initializer_range")
# MiniCPM-MoE's config.json: num_experts (absent, null or 0: the dense model) experts per layer, each
# token routed to num_experts_per_tok of them. Written only for an MoE model.
MOE_FIELDS = ("num_experts", "num_experts_per_tok")


def read_json_file(path: Path, what: str = "JSON") -> object:
    """A JSON file's value; every way it can be unusable is a ConversionError naming the file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing") from None
    except IsADirectoryError:
        raise ConversionError(f"{path}: is a directory, not a {what} file") from None
    except OSError as exc:
        raise ConversionError(describe_os_error(exc, path)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConversionError(describe_decode_error(path, exc)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise ConversionError(f"{path}: not valid JSON (nested too deeply)") from None


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _check_field(path: Path, key: str, value) -> None:
    if key in INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConversionError(f"{path}: {key} must be an integer, got {_json_type(value)} ({value!r})")
        if value < 1:
            raise ConversionError(f"{path}: {key} must be >= 1, got {value}")
    elif key in FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConversionError(f"{path}: {key} must be a number, got {_json_type(value)} ({value!r})")
        if not math.isfinite(value):
            raise ConversionError(f"{path}: {key} must be finite, got {value}")
        if key in ("scale_emb", "scale_depth", "rope_theta", "rms_norm_eps") and value <= 0:
            raise ConversionError(f"{path}: {key} must be > 0, got {value}")
    elif key == "tie_word_embeddings" and not isinstance(value, bool):
        raise ConversionError(f"{path}: tie_word_embeddings must be true or false, got {_json_type(value)} ({value!r})")
    elif key == "rope_scaling" and not isinstance(value, dict):
        raise ConversionError(f"{path}: rope_scaling must be an object or null, got {_json_type(value)}")


def _moe_fields(path: Path, hf: Dict) -> Dict[str, int]:
    """num_experts and num_experts_per_tok of a MiniCPM-MoE config.json ({} for a dense one): integers,
    num_experts >= 0 and, with experts, num_experts_per_tok in 1..num_experts (not defaulted: k is part
    of the model's function)."""
    experts = hf.get("num_experts")
    if experts is None:
        return {}
    if isinstance(experts, bool) or not isinstance(experts, int):
        raise ConversionError(f"{path}: num_experts must be an integer, got {_json_type(experts)} ({experts!r})")
    if experts < 0:
        raise ConversionError(f"{path}: num_experts must be >= 0 (0: no experts), got {experts}")
    if experts == 0:
        return {}  # a dense MiniCPM; whatever num_experts_per_tok says is unused
    k = hf.get("num_experts_per_tok")
    if k is None:
        raise ConversionError(f"{path}: missing num_experts_per_tok (the experts each token is routed to; "
                              f"needed with num_experts {experts})")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ConversionError(f"{path}: num_experts_per_tok must be an integer, got {_json_type(k)} ({k!r})")
    if not 1 <= k <= experts:
        raise ConversionError(f"{path}: num_experts_per_tok must be in 1..num_experts ({experts}), got {k}")
    return {"num_experts": experts, "num_experts_per_tok": k}


def model_config_from_hf(directory: Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face MiniCPM directory's config.json.

    Refused, with one line naming the file and the field: a file that is not UTF-8 JSON or not an
    object; a model_type other than 'minicpm' or architectures without a MiniCPM class; a missing
    required field (the shape and the muP multipliers scale_emb, dim_model_base, scale_depth: without
    them it is not MiniCPM's function); a field of the wrong type, non-finite or out of range
    (num_experts_per_tok outside 1..num_experts included).
    """
    path = Path(directory) / CONFIG
    hf = read_json_file(path)
    if not isinstance(hf, dict):
        raise ConversionError(f"{path}: {_json_type(hf)}, not a JSON object")
    model_type, architectures = hf.get("model_type"), hf.get("architectures")
    if model_type is None and architectures is None:
        raise ConversionError(f"{path}: neither model_type nor architectures (expected model_type 'minicpm')")
    if model_type is not None and model_type != "minicpm":
        raise ConversionError(f"{path}: model_type {model_type!r} is not MiniCPM (expected 'minicpm'); megacpm "
                              "converts MiniCPM directories only (a Llama-format export cannot be read back: "
                              "its muP multipliers are folded into the weights)")
    if architectures is not None:
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            raise ConversionError(f"{path}: architectures must be an array of strings, got {architectures!r}")
        if not any("MiniCPM" in a for a in architectures):
            raise ConversionError(f"{path}: architectures {architectures} is not MiniCPM "
                                  "(megacpm reads MiniCPM directories)")
    missing = [k for k in REQUIRED_FIELDS if hf.get(k) is None]
    if missing:
        mup = [k for k in missing if k in MUP_FIELDS]
        why = (f" (MiniCPM's muP multipliers {', '.join(MUP_FIELDS)}: without them this is not a MiniCPM "
               "config)") if mup else ""
        raise ConversionError(f"{path}: missing {', '.join(missing)}{why}")
    fields = {k: hf[k] for k in SHARED_FIELDS if k in hf and hf[k] is not None}
    for key, value in fields.items():
        _check_field(path, key, value)
    fields.update(_moe_fields(path, hf))
    fields.setdefault("num_key_value_heads", hf["num_attention_heads"])
    fields.setdefault("tie_word_embeddings", True)  # MiniCPMConfig's default
    try:
        return config_from_dict({"model": fields}).model
    except ConfigError as exc:
        raise ConversionError(f"{path}: {exc}") from None


def refuse_llama_moe(cfg: ModelConfig, llama: bool, where: object) -> None:
    """A Llama-format export of a mixture-of-experts model: a ConversionError naming ``where``."""
    if llama and cfg.is_moe:
        raise ConversionError(f"{where}: a mixture-of-experts model (model.num_experts {cfg.num_experts}) has no "
                              "Llama format (LlamaForCausalLM has no experts); write the MiniCPM format instead "
                              "(convert_checkpoint without --llama-format)")


def hf_config(cfg: ModelConfig, dtype: torch.dtype, llama: bool) -> Dict:
    refuse_llama_moe(cfg, llama, CONFIG)
    common = {"hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "use_cache": True,
              "torch_dtype": str(dtype).replace("torch.", ""),
              **{k: getattr(cfg, k) for k in SHARED_FIELDS if k not in ("scale_emb", "scale_depth", "dim_model_base")}}
    if llama:
        common.update(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False,
                      attention_bias=False, mlp_bias=False, head_dim=cfg.head_dim, pretraining_tp=1)
        if cfg.rope_scaling is not None:
            common["rope_scaling"] = {"rope_type": cfg.rope_scaling.get("type", "dynamic"),
                                      "factor": cfg.rope_scaling["factor"]}
        return common
    moe = {k: getattr(cfg, k) for k in MOE_FIELDS} if cfg.is_moe else {}  # a dense config.json as before
    return {**common, "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "auto_map": MINICPM_AUTO_MAP,
            "scale_emb": cfg.scale_emb, "scale_depth": cfg.scale_depth, "dim_model_base": cfg.dim_model_base, **moe}


# -- weights ---------------------------------------------------------------------------------------
def _weight_files(directory: Path) -> Iterable[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.is_file():
            content = read_json_file(index)
            weight_map = content.get("weight_map") if isinstance(content, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index}: needs a non-empty \"weight_map\" object (tensor name -> file)")
            files = set(weight_map.values())
            bad = sorted(repr(f) for f in files if not isinstance(f, str) or not f or "/" in f or f in (".", ".."))
            if bad:
                raise ConversionError(f"{index}: weight_map names {bad[0]}, not a file name in {directory}")
            return [directory / name for name in sorted(files)]
        if (directory / single).is_file():
            return [directory / single]
    raise ConversionError(f"{directory}: no model.safetensors, pytorch_model.bin or their *.index.json")


def _read_file(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"{path}: missing (named by the index)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # local: safetensors is optional for .bin directories

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files: one line naming the file
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConversionError(f"{path}: cannot be read ({type(exc).__name__}: {detail})") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise ConversionError(f"{path}: not a mapping of tensor names to tensors")
    return tensors


def expected_shapes(cfg: ModelConfig) -> Dict[str, torch.Size]:
    """The model-space shapes a checkpoint of ``cfg`` holds (megacpm.model.params.parameter_shapes)."""
    return parameter_shapes(cfg)


def _hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else HF_PREFIX + name


# megacpm's stacked expert tensors (MoEMLP's w1 gate, w3 up, w2 down) and Hugging Face's per-expert ones.
_STACKED_EXPERTS = re.compile(r"(layers\.\d+\.mlp)\.(w1|w2|w3)")


def expert_names(name: str, num_experts: int) -> Optional[List[str]]:
    """The Hugging Face names (without the ``model.`` prefix) of the experts of a stacked megacpm
    tensor, expert e's at index e: ``layers.L.mlp.w1`` -> ``layers.L.mlp.experts.e.w1.weight``;
    None for a tensor that is not stacked experts. The one home of that mapping, both ways."""
    match = _STACKED_EXPERTS.fullmatch(name)
    if match is None:
        return None
    return [f"{match[1]}.experts.{e}.{match[2]}.weight" for e in range(num_experts)]


def _hf_layout(cfg: ModelConfig, shapes: Dict[str, torch.Size]) -> Dict[str, Tuple[str, Optional[int], torch.Size]]:
    """HF name (unprefixed) -> (megacpm name, expert index or None, HF shape), in megacpm order."""
    layout = {}
    for name, shape in shapes.items():
        experts = expert_names(name, cfg.num_experts)
        if experts is None:
            layout[name] = (name, None, shape)
        else:
            layout.update({hf: (name, e, shape[1:]) for e, hf in enumerate(experts)})
    return layout


def hf_tensors(cfg: ModelConfig, weights: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """megacpm weights as Hugging Face tensors (names unprefixed) of ``dtype``, contiguous, stacked
    experts split one per expert (each a copy: safetensors refuses tensors that share storage)."""
    out = {}
    for name, tensor in weights.items():
        experts = expert_names(name, cfg.num_experts)
        if experts is None:
            out[name] = tensor.to(dtype).contiguous()
        else:
            out.update({hf: tensor[e].to(dtype, copy=True).contiguous() for e, hf in enumerate(experts)})
    return out


def read_hf_weights(directory: Path, cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """The directory's tensors under megacpm names, fp32, checked against the config's shapes: a
    missing, unexpected, misshapen or non-floating tensor is one line naming it and its file. An
    MoE model's per-expert tensors are checked one by one, then stacked."""
    directory = Path(directory)
    tensors: Dict[str, torch.Tensor] = {}
    origin: Dict[str, Path] = {}
    files = list(_weight_files(directory))
    for path in files:
        for name, tensor in _read_file(path).items():
            name = name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name
            tensors[name], origin[name] = tensor, path
    megacpm_shapes = expected_shapes(cfg)
    layout = _hf_layout(cfg, megacpm_shapes)
    shapes = {name: shape for name, (_, _, shape) in layout.items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some exports store the tied copy too
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer, not a weight
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    where = files[0] if len(files) == 1 else directory
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{where}: tensor {_hf_name(missing[0])} is missing{more}; "
                              f"{CONFIG} implies {len(shapes)} tensors")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(f"{origin[unexpected[0]]}: unexpected tensor {_hf_name(unexpected[0])}{more}, "
                              f"not part of the model {CONFIG} describes")
    for name, shape in shapes.items():
        tensor = tensors[name]
        if tensor.shape != shape:
            raise ConversionError(f"{origin[name]}: tensor {_hf_name(name)} has shape {tuple(tensor.shape)}, "
                                  f"{CONFIG} implies {tuple(shape)}")
        if not tensor.is_floating_point():
            raise ConversionError(f"{origin[name]}: tensor {_hf_name(name)} is {str(tensor.dtype).replace('torch.', '')}, "
                                  "not a floating-point weight")
    weights: Dict[str, torch.Tensor] = {}
    for name, (megacpm_name, expert, _) in layout.items():  # in megacpm's order
        tensor = tensors.pop(name)
        if expert is None:
            weights[megacpm_name] = tensor.float()
        else:  # stacked in place: no second copy of the experts
            if megacpm_name not in weights:
                weights[megacpm_name] = torch.empty(megacpm_shapes[megacpm_name], dtype=torch.float32)
            weights[megacpm_name][expert].copy_(tensor)
    return weights


def llama_weights(cfg: ModelConfig, weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The same function as MiniCPM with the muP multipliers folded into the weights."""
    folded = dict(weights)
    folded["embed_tokens.weight"] = weights["embed_tokens.weight"] * cfg.embedding_scale
    output = weights["embed_tokens.weight"] if cfg.tie_word_embeddings else weights["lm_head.weight"]
    folded["lm_head.weight"] = output / cfg.width_mult
    for name, tensor in weights.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            folded[name] = tensor * cfg.residual_scale
    return folded


def write_hf_directory(directory: Path, cfg: ModelConfig, weights: Dict[str, torch.Tensor], dtype: torch.dtype,
                       llama: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """config.json + safetensors (sharded with an index past ``max_shard_bytes``), written atomically."""
    from safetensors.torch import save_file  # local: an optional package, needed only to write

    directory = Path(directory)
    if directory.exists():
        raise ConversionError(f"{directory}: already exists")
    refuse_llama_moe(cfg, llama, directory)
    if llama:
        weights = llama_weights(cfg, weights)
    named = {_hf_name(name): t for name, t in hf_tensors(cfg, weights, dtype).items()}
    shards, current, size = [], {}, 0
    for name, tensor in named.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensor, size + nbytes
    shards.append(current)
    with atomic_directory(directory) as tmp:
        (tmp / CONFIG).write_text(json.dumps(hf_config(cfg, dtype, llama), indent=2))
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / file), metadata={"format": "pt"})
                weight_map.update({name: file for name in shard})
            total = sum(t.numel() * t.element_size() for t in named.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return directory


# -- megacpm checkpoints ---------------------------------------------------------------------------
def megacpm_config(path: Path) -> tuple[Path, Config]:
    """(checkpoint directory, its config) of a megacpm run directory (its latest checkpoint) or
    checkpoint directory, without reading the weights."""
    checkpoint = resolve_checkpoint(path)
    return checkpoint, load_config(str(checkpoint / CONFIG_FILE))


def read_megacpm(path: Path) -> tuple[Config, Dict[str, torch.Tensor]]:
    """(config, fp32 model-space weights) of a megacpm run directory (its latest checkpoint) or
    checkpoint directory, read in one process whatever layout wrote it."""
    checkpoint, cfg = megacpm_config(path)
    return cfg, read_weights(checkpoint, cfg.model, expected_shapes(cfg.model))


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> MiniCPM:
    """A MiniCPM in one process from a Hugging Face MiniCPM directory or a megacpm run/checkpoint
    directory; ``model(input_ids)`` gives fp32 logits [batch, seq, vocab], in eval mode."""
    path = Path(path)
    if is_hf_directory(path):
        cfg = model_config_from_hf(path)
        weights = read_hf_weights(path, cfg)
        biases = {}
    else:
        config, weights = read_megacpm(path)
        cfg = config.model
        biases = read_router_biases(megacpm_config(path)[0], cfg)
    model = MiniCPM(cfg)
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        for name, bias in biases.items():  # an MoE run's balancing biases: part of how it routes
            model.get_buffer(name).copy_(bias)
    model = model.to(device=device or torch.device("cpu"), dtype=dtype).eval()
    for layer in model.layers:
        if layer.is_moe:
            layer.mlp.router_bias = layer.mlp.router_bias.float()  # the biases stay fp32, as in training
    return model
