"""Hugging Face interop: MiniCPM directories in and out, the Llama-format export, load_pretrained.

A Hugging Face MiniCPM directory is config.json plus weights (``model.safetensors``,
``pytorch_model.bin``, or either sharded with its ``*.index.json``), tensors named as megacpm names
them with a ``model.`` prefix (``lm_head.weight`` without it; absent when the embedding is tied).
The muP multipliers live in config.json (scale_emb, scale_depth, dim_model_base), so a MiniCPM
directory holds the very tensors megacpm trains: conversion is renaming, bit-exact both ways.

The Llama format folds the multipliers into the weights for code that knows nothing of muP
(transformers' LlamaForCausalLM): embedding x scale_emb; o_proj and down_proj x scale_depth/sqrt(L);
an LM head / (hidden_size / dim_model_base), untied (the tied embedding cannot carry both factors).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

from megacpm.checkpoint.branch import resolve_checkpoint
from megacpm.checkpoint.manager import CheckpointError, read_weights
from megacpm.config import Config, ModelConfig, load_config
from megacpm.config.loader import config_from_dict
from megacpm.io.atomic import atomic_directory
from megacpm.io.run_dir import CONFIG_FILE
from megacpm.model import MiniCPM

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


def model_config_from_hf(directory: Path) -> ModelConfig:
    path = Path(directory) / CONFIG
    try:
        hf = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: {'missing' if isinstance(exc, FileNotFoundError) else 'not valid JSON'}") from None
    architectures = hf.get("architectures") or ["MiniCPMForCausalLM"]
    if not any("MiniCPM" in a for a in architectures):
        raise ConversionError(f"{path}: architectures {architectures} is not MiniCPM (megacpm reads MiniCPM directories)")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in hf]
    if missing:
        raise ConversionError(f"{path}: missing {', '.join(missing)}")
    fields = {k: hf[k] for k in SHARED_FIELDS if k in hf and hf[k] is not None}
    fields.setdefault("num_key_value_heads", hf["num_attention_heads"])
    fields.setdefault("tie_word_embeddings", True)  # MiniCPMConfig's default
    return config_from_dict({"model": fields}).model


def hf_config(cfg: ModelConfig, dtype: torch.dtype, llama: bool) -> Dict:
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
    return {**common, "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "auto_map": MINICPM_AUTO_MAP,
            "scale_emb": cfg.scale_emb, "scale_depth": cfg.scale_depth, "dim_model_base": cfg.dim_model_base}


# -- weights ---------------------------------------------------------------------------------------
def _weight_files(directory: Path) -> Iterable[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            return [directory / name for name in sorted(set(weight_map.values()))]
        if (directory / single).is_file():
            return [directory / single]
    raise ConversionError(f"{directory}: no model.safetensors, pytorch_model.bin or their *.index.json")


def _read_file(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"{path}: missing (named by the index)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # local: safetensors is optional for .bin directories

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files: one line naming the file
        raise ConversionError(f"{path}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def expected_shapes(cfg: ModelConfig) -> Dict[str, torch.Size]:
    with torch.device("meta"):
        return {name: p.shape for name, p in MiniCPM(cfg).named_parameters()}


def read_hf_weights(directory: Path, cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """The directory's tensors under megacpm names, fp32, checked against the config's shapes."""
    directory = Path(directory)
    tensors: Dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        for name, tensor in _read_file(path).items():
            tensors[name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name] = tensor
    shapes = expected_shapes(cfg)
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some exports store the tied copy too
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer, not a weight
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise ConversionError(f"{directory}: tensors do not match config.json "
                              f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                              f"unexpected: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    for name, shape in shapes.items():
        if tensors[name].shape != shape:
            raise ConversionError(f"{directory}: {HF_PREFIX if name != 'lm_head.weight' else ''}{name} has shape "
                                  f"{tuple(tensors[name].shape)}, config.json implies {tuple(shape)}")
    return {name: tensors[name].float() for name in shapes}


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
    if llama:
        weights = llama_weights(cfg, weights)
    named = {(name if name == "lm_head.weight" else HF_PREFIX + name): t.to(dtype).contiguous()
             for name, t in weights.items()}
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
def read_megacpm(path: Path) -> tuple[Config, Dict[str, torch.Tensor]]:
    """(config, fp32 model-space weights) of a megacpm run directory (its latest checkpoint) or
    checkpoint directory, read in one process whatever layout wrote it."""
    checkpoint = resolve_checkpoint(path)
    cfg = load_config(str(checkpoint / CONFIG_FILE))
    return cfg, read_weights(checkpoint, cfg.model, expected_shapes(cfg.model))


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> MiniCPM:
    """A MiniCPM in one process from a Hugging Face MiniCPM directory or a megacpm run/checkpoint
    directory; ``model(input_ids)`` gives fp32 logits [batch, seq, vocab], in eval mode."""
    path = Path(path)
    if is_hf_directory(path):
        cfg = model_config_from_hf(path)
        weights = read_hf_weights(path, cfg)
    else:
        config, weights = read_megacpm(path)
        cfg = config.model
    model = MiniCPM(cfg)
    model.load_state_dict(weights, strict=True)
    return model.to(device=device or torch.device("cpu"), dtype=dtype).eval()
