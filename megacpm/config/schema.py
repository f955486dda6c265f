"""Typed configuration of a megacpm run: one dataclass per section.

Field names follow ../docs/interface.md (and Hugging Face's MiniCPM names for the model), so a
config can be written as YAML, overridden with ``--section.key=value`` and serialised back to the
run directory's ``config.yaml`` unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union, get_args

# The choices of every string field with a fixed set of values: the Literal types are their one
# home (the loader checks a value against them; code that needs the list reads it from here).
AttentionImpl = Literal["auto", "sdpa", "flash", "eager"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]
CpAttention = Literal["all_gather", "ring"]  # megacpm.parallel.context_parallel's two cores
ScheduleKind = Literal["wsd", "cosine", "constant"]
DecayShape = Literal["exp", "linear", "cosine", "1-sqrt"]
DataSource = Literal["embedded", "text", "megatron", "sft", "preference"]
TooLong = Literal["drop", "truncate"]
WandbMode = Literal["online", "offline"]

ATTENTION_IMPLS = get_args(AttentionImpl)
DEVICES = get_args(Device)
PRECISIONS = get_args(Precision)
SCHEDULE_KINDS = get_args(ScheduleKind)
DECAY_SHAPES = get_args(DecayShape)
DATA_SOURCES = get_args(DataSource)
WANDB_MODES = get_args(WandbMode)
TOO_LONG_POLICIES = get_args(TooLong)
CHAT_SOURCES = ("sft", "preference")  # the data sources of chat samples (megacpm.data.chat)
BUILTIN_CHAT_TEMPLATES = ("minicpm", "chatml", "none")  # data.chat_template: these, or a template file


@dataclass
class ModelConfig:
    """MiniCPM architecture and its muP hyperparameters (Hugging Face names where one exists)."""

    hidden_size: int = 256
    intermediate_size: int = 640
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    vocab_size: int = 8192
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    # None, or {"type": "dynamic", "factor": F}: NTK-aware scaling of the 128K model.
    rope_scaling: Optional[Dict[str, Any]] = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_dropout: float = 0.0  # on the attention probabilities, in training (MiniCPM uses none)
    # muP (MiniCPM, Table 7). use_mup=False gives the standard parametrisation used as the
    # wind tunnel's baseline: no forward multipliers, plain init_std and one learning rate.
    use_mup: bool = True
    scale_emb: float = 12.0
    scale_depth: float = 1.4
    dim_model_base: int = 256
    initializer_range: float = 0.1
    # Whether the (tied) embedding counts as a "2-D tensor" for muP's init std / lr rules. The
    # paper's literal wording says it does; the sources do not settle it.
    mup_embedding_as_matrix: bool = True
    # "auto": flash-attn on CUDA when installed, else torch's scaled_dot_product_attention.
    attention_impl: AttentionImpl = "auto"
    # Mixture of experts (MiniCPM-MoE; megacpm.model.moe): 0 = the dense MLP. Each MoE layer has
    # num_experts SwiGLU experts of intermediate_size and routes every token to num_experts_per_tok.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    # Switch load-balancing loss E * sum_i importance_i * load_i per layer (1 at balance), summed
    # over layers; this coefficient times it is added to the objective's loss.
    moe_aux_loss_coeff: float = 0.01
    moe_z_loss_coeff: float = 0.0  # ST-MoE router z-loss, summed over layers
    # None = dropless; c = each expert takes at most ceil(c * tokens * k / E) assignments of a
    # micro-batch, in token order (the rest are dropped and counted).
    moe_capacity_factor: Optional[float] = None
    # DeepSeek-V3's auxiliary-loss-free balancing: after each step every expert's routing bias
    # moves by this rate towards balance (sign of mean load minus its load); 0 = off.
    moe_router_bias_update_rate: float = 0.0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def width_mult(self) -> float:
        """muP's m = d_model / dim_model_base (1 under the standard parametrisation)."""
        return self.hidden_size / self.dim_model_base if self.use_mup else 1.0

    @property
    def residual_scale(self) -> float:
        """r = scale_depth / sqrt(L), the multiplier of every residual branch (1 without muP)."""
        return self.scale_depth / math.sqrt(self.num_hidden_layers) if self.use_mup else 1.0

    @property
    def embedding_scale(self) -> float:
        return self.scale_emb if self.use_mup else 1.0


@dataclass
class ParallelConfig:
    """The layout's axis sizes (megacpm.parallel.layout). The data-parallel size is derived:
    world_size / (tp * cp * pp)."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    # Context parallel: each sequence split over cp ranks (head-tail chunks, balanced causal work);
    # train.seq_len must be divisible by 2 * cp.
    cp: int = 1
    # How attention sees the other cp ranks' keys: "all_gather" (K and V gathered, then each chunk
    # against its global prefix) or "ring" (K and V passed peer to peer, overlapped with compute).
    cp_attention: CpAttention = "all_gather"
    ep: int = 1  # expert parallel: experts split over blocks of ep data-parallel ranks (expert-DP = dp / ep)
    sp: bool = False
    zero1: bool = False
    # Seconds a collective may wait for a peer before the run fails with an error naming it (a
    # dead or stuck rank must not hang the others forever). Megatron's default is the same order.
    timeout_s: float = 600.0


@dataclass
class TrainConfig:
    steps: int = 200
    seed: int = 1234
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    seq_len: int = 256
    log_interval: int = 10
    eval_interval: int = 50
    eval_batches: int = 8  # micro-batches of the validation split per evaluation
    # > 0: evaluation also reports the loss by position, positions 0..seq_len in this many equal
    # buckets, as eval_loss_by_position/<first position> (lm and sft; megacpm.objectives.lm).
    eval_position_buckets: int = 0
    device: Device = "auto"
    # "auto" (bf16 on CUDA, fp32 on CPU) | "fp32" | "bf16" (bf16 parameters and activations, fp32
    # master weights, Adam state and gradient reductions)
    precision: Precision = "auto"
    activation_checkpointing: bool = False
    # torch.compile each decoder block (megacpm.model.compile): one graph per block kind, compiled
    # on the first step (the log says how long), reused by every layer; a recompile is logged.
    compile: bool = False
    num_threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    # Start from these weights (optimizer state and step fresh): a megacpm run directory (its latest
    # checkpoint), a megacpm checkpoint directory or a Hugging Face MiniCPM directory. Fine-tuning
    # (SFT after the decay, DPO after SFT) starts here; a resumed run ignores it.
    init_from: Optional[str] = None

    def uses_bf16(self, device_type: str) -> bool:
        """Whether parameters and activations are bf16 on a device of this type ("cuda", "cpu"):
        precision "bf16", or "auto" on CUDA. The one home of that rule."""
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")


@dataclass
class OptimConfig:
    """AdamW. The paper does not report betas/eps/wd/clip: these are our documented defaults."""

    lr: float = 0.01
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    # muP's per-group LR (2-D weights at lr / m). False trains every group at lr (MiniCPM's DPO);
    # the muP forward multipliers are part of the architecture and stay either way.
    mup_lr_scaling: bool = True


@dataclass
class ScheduleConfig:
    """The LR as a pure function of the (1-based) step. Unset fields are resolved by
    megacpm.config.schedule.resolve_schedule; the LR itself is megacpm.optim.schedule.LRSchedule."""

    kind: ScheduleKind = "wsd"
    warmup_steps: int = 0
    decay_start: Optional[int] = None  # first decay step; None: train.steps - decay_steps + 1
    decay: DecayShape = "exp"
    half_life: Optional[float] = None  # steps, for decay "exp"; None: decay_steps / 3.32 (lr/10 at the end)
    decay_steps: Optional[int] = None  # None: 10% of train.steps
    min_lr: Optional[float] = None  # floor; None: 0 for wsd, 0.1 * lr for cosine


@dataclass
class DataConfig:
    """Where the tokens come from.

    ``source: embedded`` is the built-in corpus (the Python standard library's own sources and
    docstrings, which exist on every machine) with a BPE tokenizer trained on it and cached.
    ``source: text`` reads UTF-8 text files from ``path`` (a file or a directory).
    ``source: megatron`` reads a Megatron indexed dataset, ``path`` being its prefix (PREFIX.bin and
    PREFIX.idx, e.g. from tools/preprocess_data.py --append-eod), memory-mapped.
    ``source: sft`` / ``preference`` read chat jsonl (``path``: a file, a directory of .jsonl files or
    a list of them; see megacpm.data.chat), rendered by ``chat_template``.
    """

    source: DataSource = "embedded"
    path: Union[str, List[str], None] = None
    # source megatron only: several prefixes and their weights, {prefix: weight} (instead of path);
    # sample i of the mixture comes from the dataset furthest below its share (megacpm.data.blending).
    mixture: Optional[Dict[str, float]] = None
    tokenizer: Optional[str] = None  # a tokenizers JSON file; None trains one on the corpus (cached)
    cache_dir: Optional[str] = None  # None: $MEGACPM_CACHE or ~/.cache/megacpm
    val_fraction: float = 0.02  # documents held out for validation
    test_fraction: float = 0.0  # documents held out as a test split (neither trained nor evaluated on)
    max_corpus_mb: float = 8.0  # cap on the embedded corpus size
    # Chat sources: "minicpm" (<用户>{user}<AI>{assistant}), "chatml", a template file, or "none"
    # (prompt ids + response ids + the end-of-document token, no special text).
    chat_template: str = "none"
    # SFT: several samples per row of train.seq_len (positions restart per sample, attention stays
    # inside it); off: one sample per row, padded.
    packing: bool = False
    # Pretraining sources: attention and positions restart after every end-of-document token.
    document_mask: bool = False
    # A chat sample longer than train.seq_len: dropped (counted and reported) or cut to fit.
    too_long: TooLong = "drop"


@dataclass
class CheckpointConfig:
    interval: int = 100  # steps; 0 saves only at the end (and on SIGTERM / Ctrl-C)
    keep: int = 3  # newest complete checkpoints kept; 0 keeps all
    # Write interval checkpoints in a background thread while training goes on: the step pays only
    # for copying the state to host memory. The checkpoint becomes `latest` once every rank's
    # write has finished (checked each step); the last one of a run is written synchronously.
    async_save: bool = False


@dataclass
class LogConfig:
    tensorboard: bool = True
    progress: bool = True  # console progress bar
    nvml: bool = True  # GPU memory / utilisation when nvidia-ml-py and a GPU are present
    # Weights & Biases (optional package wandb), rank 0 only. "offline" writes RUN/wandb/ for a
    # later `wandb sync` and needs no network.
    wandb: bool = False
    wandb_project: str = "megacpm"
    wandb_mode: WandbMode = "online"
    # torch.profiler traces of these steps, every rank, under RUN/profile/ (TensorBoard or Perfetto).
    profile_steps: Optional[List[int]] = None


ObjectiveKind = Literal["lm", "sft", "dpo"]  # megacpm.objectives.OBJECTIVES
DpoLoss = Literal["sigmoid", "ipo", "hinge"]
ReferenceMode = Literal["precompute", "live"]
OBJECTIVE_KINDS = get_args(ObjectiveKind)
DPO_LOSSES = get_args(DpoLoss)
REFERENCE_MODES = get_args(ReferenceMode)


@dataclass
class ObjectiveConfig:
    """What a training step minimises (megacpm.objectives): "lm" is next-token prediction with the
    token-weighted mean cross entropy of the step; "sft" the same over the completion tokens of chat
    samples; "dpo" direct preference optimisation over (chosen, rejected) pairs. The other fields
    are DPO's."""

    kind: ObjectiveKind = "lm"
    beta: float = 0.1
    loss: DpoLoss = "sigmoid"
    label_smoothing: float = 0.0  # conservative DPO (sigmoid only): the chance a label is flipped
    # "precompute": the initial weights score every pair once into the run directory, then only the
    # policy is in memory; "live": a frozen copy of the initial weights scores each batch.
    reference: ReferenceMode = "precompute"


@dataclass
class RunConfig:
    dir: Optional[str] = None  # None: runs/<config name>
    name: str = "run"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


SECTIONS = ("run", "model", "parallel", "train", "optim", "schedule", "data", "checkpoint", "log", "objective")
