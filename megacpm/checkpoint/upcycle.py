"""Sparse upcycling (Komatsuzaki et al. 2022, MiniCPM-MoE): a dense checkpoint becomes the first
checkpoint of a mixture-of-experts run.

The upcycled run directory is a branch's (megacpm.checkpoint.branch), with its own checkpoint:
  config.yaml          the parent's config, model.num_experts and model.num_experts_per_tok set
                       (8 and 2 unless overridden: MiniCPM-MoE-8x2B), the overrides on top
  lineage.json         a branch's lineage, plus "upcycle": the experts, top-k, router seed and std,
                       and the optimizer rule
  checkpoints/step_N/  the upcycled state at the parent's step; latest names it

Weights: every expert of layer l is an exact copy of layer l's dense SwiGLU (w1 = gate_proj, w3 =
up_proj, w2 = down_proj); the router is drawn from N(0, router_std^2) with a generator seeded by
the recorded seed, layer by layer (megacpm.model.moe.draw_router); every other tensor is
the parent's. The k routing weights of a token sum to 1 over identical experts, so the upcycled
model computes the dense model's function (without a capacity that drops assignments).

The optimizer state follows one of two rules:
- ``carry`` (the default): the AdamW step count goes on and every weight keeps its moments; an
  expert takes the moments of the dense weight it copies (it is that weight until routing sets the
  experts apart). The router, the one new tensor, starts with zero moments: its first updates are
  the larger ones of a fresh Adam state under a late bias correction, which the upcycled run's own
  warmup keeps small.
- ``reset``: a fresh optimizer, every moment zero and the step count 0.
The counters (step, tokens, consumed samples, the data position) are the parent's, so a new data
mixture is handled as in any branch. The parent is only read, and the new run is assembled under
a temporary name and renamed: it exists complete or not at all.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Dict, Iterable, List

import torch

from megacpm.checkpoint.branch import check_branch_shape, lineage_record, write_derived_checkpoint
from megacpm.checkpoint.catalog import CheckpointError, read_trainer_state, saved_shape
from megacpm.config import Config, dump_yaml
from megacpm.io.atomic import atomic_directory
from megacpm.io.run_dir import CONFIG_FILE, LINEAGE_FILE

DEFAULT_EXPERTS, DEFAULT_TOP_K = 8, 2  # MiniCPM-MoE-8x2B
ROUTER_STD = 0.1  # MiniCPM-MoE's router initialisation, N(0, 0.1^2)
OPTIMIZER_RULES = ("carry", "reset")
DENSE_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # expert tensor <- dense weight


def check_upcycle_source(checkpoint: Path) -> Dict:
    """The source checkpoint's trainer state, refused in one line when it is already an MoE."""
    meta = read_trainer_state(checkpoint)
    experts = saved_shape(meta.get("model") if isinstance(meta.get("model"), dict) else {})["num_experts"]
    if experts:
        raise CheckpointError(f"{checkpoint}: already a mixture of experts (model.num_experts = {experts}); "
                              "upcycling turns a dense checkpoint into one")
    return meta


def upcycled_state(dense: Dict[str, Dict[str, torch.Tensor]], cfg: Config, router_seed: int,
                   router_std: float = ROUTER_STD, optimizer: str = "carry") -> Dict[str, Dict]:
    """The model-space state dict of the upcycled model (``cfg``: its MoE config) from the dense
    checkpoint's ({"model": weights, "optim": {"exp_avg", "exp_avg_sq"}}). Experts are expanded
    views of the dense tensors (no copy until written)."""
    from megacpm.model.moe import draw_router  # the one home of the router's initialisation

    if optimizer not in OPTIMIZER_RULES:
        raise ValueError(f"optimizer rule {optimizer!r} (expected one of {', '.join(OPTIMIZER_RULES)})")
    m = cfg.model
    generator = torch.Generator().manual_seed(router_seed)
    weights = dict(dense["model"])
    moments = {key: dict(values) for key, values in dense["optim"].items()}
    for layer in range(m.num_hidden_layers):
        prefix = f"layers.{layer}.mlp."
        dense_weights = {kind: weights.pop(prefix + f"{name}.weight") for kind, name in DENSE_MLP.items()}
        dense_moments = {key: {kind: values.pop(prefix + f"{name}.weight") for kind, name in DENSE_MLP.items()}
                         for key, values in moments.items()}
        router = draw_router(m.num_experts, m.hidden_size, router_std, generator)
        weights[prefix + "gate.weight"] = router
        for kind, tensor in dense_weights.items():
            weights[prefix + kind] = tensor.expand(m.num_experts, *tensor.shape)
        for key, values in moments.items():
            values[prefix + "gate.weight"] = torch.zeros_like(router)
            for kind, tensor in dense_moments[key].items():
                values[prefix + kind] = tensor.expand(m.num_experts, *tensor.shape)
    buffers = {f"layers.{layer}.mlp.router_bias": torch.zeros(m.num_experts) for layer in range(m.num_hidden_layers)}
    if optimizer == "reset":
        return {"model": weights, "buffers": buffers}  # a weights-only checkpoint: a fresh optimizer
    return {"model": weights, "optim": moments, "buffers": buffers}


def create_upcycled_run(checkpoint: Path, new_run: Path, cfg: Config, overrides: Iterable[str],
                        router_seed: int, router_std: float = ROUTER_STD, optimizer: str = "carry") -> Path:
    """Assemble the upcycled run ``new_run`` from the dense ``checkpoint`` (see the module
    docstring). Refused before anything is written: a source that is already MoE, a config that
    changes the model's shape other than by adding experts, an existing ``new_run``."""
    from megacpm.checkpoint.manager import read_state  # local: DCP, the model
    from megacpm.model.params import parameter_shapes

    checkpoint, new_run = Path(checkpoint).resolve(), Path(new_run)
    overrides = list(overrides)
    meta = check_upcycle_source(checkpoint)
    check_branch_shape(checkpoint, meta, dump_yaml(cfg), overrides, allowed={"num_experts"})
    if not cfg.model.is_moe:
        raise CheckpointError("model.num_experts: upcycling needs at least one expert, got 0")
    if new_run.exists():
        raise CheckpointError(f"{new_run}: already exists; an upcycled run is created in a new directory")
    parent_cfg = _dense_config(cfg)
    dense = read_state(checkpoint, parent_cfg.model, parameter_shapes(parent_cfg.model))
    state = upcycled_state(dense, cfg, router_seed, router_std, optimizer)
    lineage = lineage_record(checkpoint, meta, overrides)
    lineage["upcycle"] = {"num_experts": cfg.model.num_experts, "num_experts_per_tok": cfg.model.num_experts_per_tok,
                          "router_seed": router_seed, "router_std": router_std, "optimizer": optimizer}
    with atomic_directory(new_run) as tmp:
        # The parent's counters and RNG states (every rank's) continue in the upcycled run, as in a branch.
        write_derived_checkpoint(tmp, cfg, state, meta, checkpoint, None if optimizer == "carry" else 0)
        (tmp / CONFIG_FILE).write_text(dump_yaml(cfg))
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1))
    return new_run


def _dense_config(cfg: Config) -> Config:
    """The config of the dense parent: ``cfg`` without experts."""
    dense = copy.deepcopy(cfg)
    dense.model.num_experts = 0
    return dense


def upcycle_defaults(overrides: Iterable[str]) -> List[str]:
    """MiniCPM-MoE's expert count and top-k unless the overrides set them."""
    given = {o.lstrip("-").split("=", 1)[0] for o in overrides}
    defaults = [f"--model.num_experts={DEFAULT_EXPERTS}"] if "model.num_experts" not in given else []
    if "model.num_experts_per_tok" not in given:
        defaults.append(f"--model.num_experts_per_tok={DEFAULT_TOP_K}")
    return defaults

