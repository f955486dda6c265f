"""Semantic checks of a Config: every value that cannot work is one ConfigError naming its key.

Runs before any process group, directory or file is created, and creates nothing itself: the paths
are only looked at (``os.stat``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import stat
import typing
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple

from megacpm.config.loader import ConfigError, check_choice, check_finite, shown
from megacpm.config.schedule import resolve_schedule
from megacpm.config.schema import BUILTIN_CHAT_TEMPLATES, CHAT_SOURCES, SECTIONS, Config
from megacpm.parallel.layout import LayoutError, ParallelLayout

MAX_PROFILED_STEPS = 16  # log.profile_steps: each trace is tens of MB
MAX_THREADS = 65536  # train.num_threads: torch.set_num_threads overflows far above any machine
MAX_TIMEOUT_S = 1e9  # parallel.timeout_s (about 31 years): larger overflows the process group's timedelta


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        need = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"{key}: must be {need}, got {value}")


def validate_choices(cfg: Config) -> None:
    """Every Literal-typed field holds one of its choices. The loader checks them as it reads; this
    catches a Config built or changed in code, with the same message and the same (typed) choices."""
    for section in SECTIONS:
        section_obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(section_obj))
        for f in dataclasses.fields(section_obj):
            if typing.get_origin(hints[f.name]) is typing.Literal:
                check_choice(f"{section}.{f.name}", getattr(section_obj, f.name), hints[f.name])


def _fields(cfg: Config) -> Iterator[Tuple[str, Any]]:
    """(``section.field``, value) of every field of every section."""
    for section in SECTIONS:
        section_obj = getattr(cfg, section)
        for f in dataclasses.fields(section_obj):
            yield f"{section}.{f.name}", getattr(section_obj, f.name)


def _nested(key: str, value: Any) -> Iterator[Tuple[str, Any]]:
    """(key, value) of ``value`` and of everything inside it, mapping keys included."""
    yield key, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{key}[{k!r}]", k
            yield from _nested(f"{key}[{k!r}]", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _nested(f"{key}[{i}]", v)


def validate_finite(cfg: Config) -> None:
    """No NaN or infinity in any field, nested ones included. The loader refuses them as it reads;
    this catches a Config built or changed in code."""
    for key, value in _fields(cfg):
        check_finite(key, value)


def validate_text(cfg: Config) -> None:
    """Every text value is UTF-8 encodable: a path given as undecodable bytes on the command line
    (Python holds them as surrogates) could be neither logged nor written into config.yaml."""
    for key, value in _fields(cfg):
        for where, item in _nested(key, value):
            if not isinstance(item, str):
                continue
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                char = ord(item[exc.start])
                shown = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"character {item[exc.start]!r}"
                raise ConfigError(f"{where}: not valid UTF-8 ({shown} at position {exc.start}); megacpm writes "
                                  f"configs and logs as UTF-8: use a UTF-8 name") from None


def _check_path_text(key: str, value: Optional[str], nullable: bool = True) -> None:
    """A path field, when set, is a non-empty path without control characters. An empty one is
    refused (it would mean the current directory): ``null`` is how a field is unset."""
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        hint = " (null unsets it)" if nullable else ""
        raise ConfigError(f"{key}: must be a non-empty path, got {value!r}{hint}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(f"{key}: must not contain control characters, got {value!r}")


def _not_a_directory(path: str) -> Optional[str]:
    """Why ``path`` cannot be (or be made) a directory: it, or its nearest existing ancestor, is a
    file (or a broken symbolic link); None when it can, or when that cannot be told (a permission)."""
    p = Path(path)
    for candidate in (p, *p.parents):
        try:
            st = os.stat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            if os.path.islink(candidate):
                return f"{shown(candidate)} is a broken symbolic link"
            continue
        except (OSError, ValueError):
            return None
        if stat.S_ISDIR(st.st_mode):
            return None
        what = "a file" if stat.S_ISREG(st.st_mode) else "not a directory"
        if candidate == p:
            return f"{shown(path)} is {what}" + (", not a directory" if what == "a file" else "")
        return f"{shown(path)} is under {shown(candidate)}, which is {what}" + \
            (", not a directory" if what == "a file" else "")
    return None


def validate_paths(cfg: Config) -> None:
    """The run's own paths: set ones are real paths, and run.dir / data.cache_dir can be directories."""
    _check_path_text("run.dir", cfg.run.dir)
    _check_path_text("train.init_from", cfg.train.init_from)
    for path in data_paths(cfg.data.path):
        _check_path_text("data.path", path)
    for key in ("tokenizer", "cache_dir"):
        _check_path_text(f"data.{key}", getattr(cfg.data, key))
    for prefix in cfg.data.mixture or {}:
        _check_path_text(f"data.mixture[{prefix!r}]", prefix, nullable=False)
    for key, path in (("run.dir", cfg.run.dir),
                      ("data.cache_dir", os.path.expanduser(cfg.data.cache_dir) if cfg.data.cache_dir else None)):
        problem = _not_a_directory(path) if path is not None else None
        if problem is not None:
            raise ConfigError(f"{key}: {problem}")


def data_paths(path) -> list:
    """data.path as a list: [] when unset, [path] for one (a list is given for several chat files)."""
    if path is None:
        return []
    return list(path) if isinstance(path, list) else [path]


DEMO_CHAT_DIR = "chat-demo"  # tools/make_chat_data.py's default output: data/chat-demo/


def _missing(key: str, path: str, need_file: bool = False) -> None:
    """ConfigError when ``path`` does not exist (or, with ``need_file``, is not a regular file)."""
    if need_file and os.path.isfile(path):
        return
    if not need_file and os.path.exists(path):
        return
    if os.path.exists(path):
        raise ConfigError(f"{key}: {shown(path)} is not a file")
    blocked = _not_a_directory(os.path.dirname(path) or ".")
    raise ConfigError(f"{key}: {shown(path)} does not exist" + (f" ({blocked})" if blocked else ""))


def validate_model(cfg: Config) -> None:
    m = cfg.model
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "dim_model_base"):
        _positive(f"model.{key}", getattr(m, key))
    for key in ("rope_theta", "rms_norm_eps", "scale_emb", "scale_depth", "initializer_range"):
        _positive(f"model.{key}", getattr(m, key))
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.num_attention_heads: {m.num_attention_heads} does not divide "
            f"model.hidden_size {m.hidden_size}"
        )
    if m.head_dim % 2:
        raise ConfigError(f"model.num_attention_heads: head_dim {m.head_dim} must be even for RoPE")
    if m.num_attention_heads % m.num_key_value_heads:
        raise ConfigError(
            f"model.num_key_value_heads: {m.num_key_value_heads} does not divide "
            f"model.num_attention_heads {m.num_attention_heads}"
        )
    if not 0.0 <= m.attention_dropout < 1.0:
        raise ConfigError(f"model.attention_dropout: must be in [0, 1), got {m.attention_dropout}")
    if m.rope_scaling is not None:
        kind = m.rope_scaling.get("type", m.rope_scaling.get("rope_type"))
        factor = m.rope_scaling.get("factor")
        if kind != "dynamic" or not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 1:
            raise ConfigError(
                "model.rope_scaling: expected null or {type: dynamic, factor: F >= 1}, "
                f"got {m.rope_scaling!r}"
            )
    validate_moe(m)


def validate_moe(m) -> None:
    _positive("model.num_experts", m.num_experts, allow_zero=True)
    for key in ("moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_router_bias_update_rate"):
        _positive(f"model.{key}", getattr(m, key), allow_zero=True)
    if m.moe_capacity_factor is not None and m.moe_capacity_factor <= 0:
        raise ConfigError(f"model.moe_capacity_factor: must be null (dropless) or positive, got "
                          f"{m.moe_capacity_factor}")
    if m.num_experts and not 1 <= m.num_experts_per_tok <= m.num_experts:
        raise ConfigError(f"model.num_experts_per_tok: {m.num_experts_per_tok} must be in 1..model.num_experts "
                          f"({m.num_experts})")


def validate_parallel(cfg: Config, world_size: int) -> None:
    p, m = cfg.parallel, cfg.model
    for key in ("tp", "pp", "vpp", "cp", "ep", "timeout_s"):
        _positive(f"parallel.{key}", getattr(p, key))
    if p.timeout_s > MAX_TIMEOUT_S:
        raise ConfigError(f"parallel.timeout_s: must be at most {MAX_TIMEOUT_S:g} seconds, got {p.timeout_s:g}")
    if p.cp > 1:
        _validate_context_parallel(cfg)
    if p.ep > 1 and not m.num_experts:
        raise ConfigError(f"parallel.ep: expert parallelism ({p.ep}) needs an MoE model (model.num_experts > 0)")
    if m.num_experts % p.ep:
        raise ConfigError(f"parallel.ep: {p.ep} does not divide model.num_experts {m.num_experts}")
    if m.num_attention_heads % p.tp:
        raise ConfigError(
            f"parallel.tp: {p.tp} does not divide model.num_attention_heads {m.num_attention_heads}"
        )
    # "parallel.tp * parallel.pp = N does not divide the world size W" comes from the layout.
    dp = data_parallel_size(cfg, world_size)
    if m.num_hidden_layers % (p.pp * p.vpp):
        raise ConfigError(
            f"parallel.pp * parallel.vpp = {p.pp * p.vpp} does not divide "
            f"model.num_hidden_layers {m.num_hidden_layers}"
        )
    per_rank = -(-m.vocab_size // p.tp)
    if per_rank * (p.tp - 1) >= m.vocab_size:
        # The vocabulary is padded to a multiple of tp, ceil(vocab / tp) rows per rank: every rank
        # must still hold at least one real token.
        raise ConfigError(f"parallel.tp: {p.tp} leaves a tensor-parallel rank without any of the "
                          f"model.vocab_size {m.vocab_size} tokens")
    if p.sp and p.tp == 1:
        raise ConfigError("parallel.sp: sequence parallelism needs parallel.tp > 1")
    if p.sp and cfg.train.seq_len % p.tp:
        raise ConfigError(f"parallel.sp: parallel.tp {p.tp} does not divide train.seq_len {cfg.train.seq_len}")
    if p.vpp > 1:
        if p.pp == 1:
            raise ConfigError("parallel.vpp: virtual pipeline stages need parallel.pp > 1")
        per_rank = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
        if per_rank % p.pp:
            raise ConfigError(
                f"parallel.vpp: the interleaved schedule needs the micro-batches per step ({per_rank} = "
                f"train.global_batch_size / (train.micro_batch_size * dp)) to be a multiple of parallel.pp {p.pp}"
            )


def _validate_context_parallel(cfg: Config) -> None:
    """What parallel.cp > 1 needs: the head-tail split of train.seq_len, and the features it does not
    combine with, each one line."""
    p, seq_len = cfg.parallel, cfg.train.seq_len
    if seq_len % (2 * p.cp):
        raise ConfigError(f"parallel.cp: train.seq_len {seq_len} is not divisible by 2 * parallel.cp = {2 * p.cp} "
                          f"(each sequence is cut into 2 * cp chunks, two per rank)")
    if p.sp and (seq_len // p.cp) % p.tp:
        raise ConfigError(f"parallel.sp: parallel.tp {p.tp} does not divide the {seq_len // p.cp} tokens of a "
                          f"sequence per context-parallel rank (train.seq_len / parallel.cp)")
    if cfg.model.attention_dropout > 0:
        raise ConfigError(f"parallel.cp: attention dropout ({cfg.model.attention_dropout}) is not supported under "
                          f"context parallelism; set model.attention_dropout to 0")
    if cfg.model.num_experts and cfg.model.moe_capacity_factor is not None:
        raise ConfigError(f"parallel.cp: model.moe_capacity_factor {cfg.model.moe_capacity_factor} is not supported "
                          f"under context parallelism (an expert's capacity is taken in the token order of the "
                          f"whole micro-batch, which cp splits); use the dropless default (null) or parallel.cp 1")


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """world_size / (tp * cp * pp), from its one home (ParallelLayout.dp); ConfigError when the
    layout cannot be built, naming the parallel.* key."""
    try:
        return ParallelLayout.from_config(cfg.parallel, world_size).dp
    except LayoutError as exc:
        raise ConfigError(str(exc)) from None


def validate_train(cfg: Config, world_size: int) -> None:
    t = cfg.train
    for key in ("steps", "global_batch_size", "micro_batch_size", "seq_len", "log_interval",
                "eval_interval"):
        _positive(f"train.{key}", getattr(t, key))
    _positive("train.eval_batches", t.eval_batches, allow_zero=True)
    _positive("train.eval_position_buckets", t.eval_position_buckets, allow_zero=True)
    if t.eval_position_buckets > t.seq_len:
        raise ConfigError(f"train.eval_position_buckets: {t.eval_position_buckets} buckets is more than the "
                          f"train.seq_len {t.seq_len} positions")
    if t.eval_position_buckets and cfg.objective.kind == "dpo":
        raise ConfigError("train.eval_position_buckets: the loss by position is a token-level metric; objective.kind "
                          "dpo has none (set it to 0)")
    _positive("train.num_threads", t.num_threads, allow_zero=True)
    if t.num_threads > MAX_THREADS:
        raise ConfigError(f"train.num_threads: must be at most {MAX_THREADS}, got {t.num_threads}")
    _positive("train.seed", t.seed, allow_zero=True)  # numpy's generators take no negative seed
    dp = data_parallel_size(cfg, world_size)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size * data-parallel size = {t.micro_batch_size} * {dp}"
        )
    if t.seq_len > cfg.model.max_position_embeddings and cfg.model.rope_scaling is None:
        raise ConfigError(
            f"train.seq_len: {t.seq_len} exceeds model.max_position_embeddings "
            f"{cfg.model.max_position_embeddings}"
        )


def validate_optim(cfg: Config) -> None:
    o = cfg.optim
    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.eps", o.eps)
    _positive("optim.clip_grad", o.clip_grad, allow_zero=True)
    for key in ("beta1", "beta2"):
        value = getattr(o, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"optim.{key}: must be in [0, 1), got {value}")


def validate_schedule(cfg: Config) -> None:
    s = cfg.schedule
    _positive("schedule.warmup_steps", s.warmup_steps, allow_zero=True)
    for key in ("decay_start", "decay_steps"):
        value: Optional[int] = getattr(s, key)
        if value is not None:
            _positive(f"schedule.{key}", value, allow_zero=True)
    if s.half_life is not None:
        _positive("schedule.half_life", s.half_life)
    if s.min_lr is not None:
        _positive("schedule.min_lr", s.min_lr, allow_zero=True)
        if s.min_lr > cfg.optim.lr:
            raise ConfigError(f"schedule.min_lr: {s.min_lr} exceeds optim.lr {cfg.optim.lr}")
    if s.decay_start is not None and s.decay_start < s.warmup_steps:
        raise ConfigError(
            f"schedule.decay_start: {s.decay_start} is before the end of warmup "
            f"(schedule.warmup_steps {s.warmup_steps})"
        )
    # The schedule's landmarks resolve its defaults; any combination they reject is a config error.
    try:
        resolve_schedule(s, cfg.optim.lr, cfg.train.steps)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def validate_data(cfg: Config) -> None:
    d = cfg.data
    if d.mixture is not None:
        if d.source != "megatron" or d.path:
            raise ConfigError("data.mixture: needs data.source megatron and replaces data.path (give one of them)")
        weights = list(d.mixture.values())
        if not d.mixture or any(not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 for w in weights) \
                or sum(weights) <= 0:
            raise ConfigError(f"data.mixture: expected {{prefix: weight}} with weights >= 0 and a positive sum, "
                              f"got {d.mixture!r}")
        for prefix in d.mixture:
            for path in (f"{prefix}.idx", f"{prefix}.bin"):
                _missing("data.mixture", path, need_file=True)
    elif d.source in ("text", "megatron", *CHAT_SOURCES):
        if d.path is None or d.path == []:
            raise ConfigError(f"data.path: required when data.source is '{d.source}'")
        if isinstance(d.path, list) and d.source not in CHAT_SOURCES:
            raise ConfigError(f"data.path: one path for data.source '{d.source}' (a list is for chat jsonl files)")
        if d.source in CHAT_SOURCES:
            for path in data_paths(d.path):
                try:
                    _missing("data.path", path)
                except ConfigError as exc:
                    if Path(path).parent.name != DEMO_CHAT_DIR:
                        raise
                    raise ConfigError(f"{exc} (the demo's chat data: run python tools/make_chat_data.py)",
                                      key="data.path") from None
        elif d.source == "megatron":
            for path in (f"{d.path}.idx", f"{d.path}.bin"):
                _missing("data.path", path, need_file=True)
        else:
            _missing("data.path", d.path)
    if d.tokenizer is not None:
        _missing("data.tokenizer", d.tokenizer, need_file=True)
    if not 0.0 < d.val_fraction < 0.5:
        raise ConfigError(f"data.val_fraction: must be in (0, 0.5), got {d.val_fraction}")
    if not 0.0 <= d.test_fraction < 0.5:
        raise ConfigError(f"data.test_fraction: must be in [0, 0.5), got {d.test_fraction}")
    _positive("data.max_corpus_mb", d.max_corpus_mb)


def validate_chat_data(cfg: Config, check_files: bool = True) -> None:
    """The chat and packing fields fit the source and the objective (checked also when planning for
    another machine: a kind the data cannot feed is wrong anywhere)."""
    d, kind = cfg.data, cfg.objective.kind
    if d.chat_template not in BUILTIN_CHAT_TEMPLATES:
        _check_path_text("data.chat_template", d.chat_template, nullable=False)
        if check_files:
            _missing("data.chat_template", d.chat_template, need_file=True)
    if kind == "dpo" and d.source != "preference":
        raise ConfigError(f"data.source: objective.kind dpo trains on preference pairs (data.source preference), "
                          f"got {d.source!r}")
    if kind == "sft" and d.source != "sft":
        raise ConfigError(f"data.source: objective.kind sft trains on chat samples (data.source sft), got {d.source!r}")
    if d.source in CHAT_SOURCES and kind not in ("sft", "dpo"):
        raise ConfigError(f"objective.kind: data.source {d.source} needs objective.kind "
                          f"{'sft' if d.source == 'sft' else 'dpo'} (got {kind!r})")
    if d.packing and d.source != "sft":
        raise ConfigError(f"data.packing: packs SFT samples (data.source sft), not data.source {d.source!r}")
    if d.document_mask and d.source in CHAT_SOURCES:
        raise ConfigError("data.document_mask: is for pretraining sources; chat samples get theirs from "
                          "data.packing")


def validate_objective(cfg: Config) -> None:
    o = cfg.objective
    _positive("objective.beta", o.beta)
    if not 0.0 <= o.label_smoothing < 0.5:
        raise ConfigError(f"objective.label_smoothing: must be in [0, 0.5), got {o.label_smoothing}")
    if o.label_smoothing > 0 and o.loss != "sigmoid":
        raise ConfigError(f"objective.label_smoothing: conservative DPO is defined for objective.loss sigmoid, "
                          f"not {o.loss!r}")


def validate_checkpoint(cfg: Config) -> None:
    _positive("checkpoint.interval", cfg.checkpoint.interval, allow_zero=True)
    _positive("checkpoint.keep", cfg.checkpoint.keep, allow_zero=True)


def validate_log(cfg: Config) -> None:
    log = cfg.log
    if log.wandb:
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("log.wandb: needs the wandb package (pip install wandb), or set log.wandb=false")
        if not log.wandb_project or any(c in log.wandb_project for c in "/\\#?%:"):
            raise ConfigError(f"log.wandb_project: must be a non-empty name without / \\ # ? % :, "
                              f"got {log.wandb_project!r}")
    if log.profile_steps is not None:
        bad = [s for s in log.profile_steps if not 1 <= s <= cfg.train.steps]
        if bad:
            raise ConfigError(f"log.profile_steps: steps must be in 1 .. train.steps ({cfg.train.steps}), got {bad}")
        if len(set(log.profile_steps)) > MAX_PROFILED_STEPS:
            raise ConfigError(f"log.profile_steps: at most {MAX_PROFILED_STEPS} steps (each trace is large), "
                              f"got {len(set(log.profile_steps))}")


def _cuda_missing_reason(torch) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if visible is not None:
        return f"torch {torch.__version__} built for CUDA {torch.version.cuda}, CUDA_VISIBLE_DEVICES={visible!r}"
    return f"torch {torch.__version__} built for CUDA {torch.version.cuda}, but no driver or GPU answers"


def validate_device(cfg: Config) -> None:
    """train.device cuda needs a visible CUDA device for this rank (GPU LOCAL_RANK). torch is
    imported only here, only when cuda is asked for: every other config error stays fast."""
    if cfg.train.device != "cuda":
        return
    import torch  # local: start-up speed (a bad config must fail without loading torch)

    if not torch.cuda.is_available():
        raise ConfigError(f"train.device: cuda requested but no CUDA device is visible ({_cuda_missing_reason(torch)})")
    try:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return  # the launcher's variable is not ours to judge here
    count = torch.cuda.device_count()
    if not 0 <= local_rank < count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(f"train.device: cuda device {local_rank} (LOCAL_RANK) requested but {count} "
                          f"CUDA device(s) are visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible else ""))


def validate(cfg: Config, world_size: int = 1, check_data: bool = True,
             check_device: Optional[bool] = None) -> Config:
    """Raise ConfigError on the first value that cannot work; return cfg unchanged otherwise.

    ``check_data``: also look at this machine's data files. ``check_device`` (default: as
    ``check_data``): train.device cuda needs a visible CUDA device. Planning a run for another
    machine (``megacpm info``) passes neither.
    """
    validate_choices(cfg)
    validate_finite(cfg)
    validate_text(cfg)
    validate_paths(cfg)
    validate_model(cfg)
    validate_parallel(cfg, world_size)
    validate_train(cfg, world_size)
    validate_optim(cfg)
    validate_schedule(cfg)
    validate_objective(cfg)
    validate_chat_data(cfg, check_files=check_data)
    if check_data:
        validate_data(cfg)
    validate_checkpoint(cfg)
    validate_log(cfg)
    if check_data if check_device is None else check_device:
        validate_device(cfg)
    return cfg
