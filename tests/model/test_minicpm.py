"""MiniCPM forward, loss, init and rotary tables against references written from the formulas here."""
import ast
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from megacpm.config import ModelConfig
from megacpm.model import MiniCPM, RotaryEmbedding, attention


def tiny_config(**overrides) -> ModelConfig:
    # m = 64 / 16 = 4, r = 1.4 / sqrt(2); GQA with two q heads per kv head.
    fields = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, dim_model_base=16, max_position_embeddings=64,
                  scale_emb=12.0, scale_depth=1.4, attention_impl="sdpa")
    fields.update(overrides)
    return ModelConfig(**fields)


def build(cfg: ModelConfig, seed: int = 0, **kwargs) -> MiniCPM:
    model = MiniCPM(cfg, **kwargs)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


# -- the reference: plain float64 torch ops on the state dict, nothing from megacpm.model ----------
def reference_logits(state, cfg: ModelConfig, ids: torch.Tensor, use_mup: bool = True) -> torch.Tensor:
    w = {name: t.double() for name, t in state.items()}
    d, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = d // n_heads
    scale_emb = cfg.scale_emb if use_mup else 1.0
    residual = cfg.scale_depth / math.sqrt(n_layers) if use_mup else 1.0
    logit_div = d / cfg.dim_model_base if use_mup else 1.0
    eps = cfg.rms_norm_eps

    def norm(x, gain):
        return gain * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    batch, seq = ids.shape
    half = torch.tensor([1.0 / cfg.rope_theta ** (2 * i / head_dim) for i in range(head_dim // 2)],
                        dtype=torch.float64)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * half[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rope(x):  # x [b, heads, s, hd]
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    h = w["embed_tokens.weight"][ids] * scale_emb
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    for i in range(n_layers):
        p = f"layers.{i}."
        x = norm(h, w[p + "input_layernorm.weight"])
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(batch, seq, n_heads, head_dim).transpose(1, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(batch, seq, n_kv, head_dim).transpose(1, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(batch, seq, n_kv, head_dim).transpose(1, 2)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, d)
        h = h + residual * (attn @ w[p + "self_attn.o_proj.weight"].T)
        x = norm(h, w[p + "post_attention_layernorm.weight"])
        gate = x @ w[p + "mlp.gate_proj.weight"].T
        up = x @ w[p + "mlp.up_proj.weight"].T
        h = h + residual * ((F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T)
    h = norm(h, w["norm.weight"])
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["embed_tokens.weight"]
    return (h / logit_div) @ head.T


def random_ids(cfg, batch=2, seq=11, seed=1):
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


# -- forward ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("use_mup", [True, False])
@pytest.mark.parametrize("impl", ["sdpa", "eager", "auto"])
def test_forward_matches_reference(tied, use_mup, impl):
    cfg = tiny_config(tie_word_embeddings=tied, use_mup=use_mup, attention_impl=impl)
    model = build(cfg)
    ids = random_ids(cfg)
    logits = model(ids)
    assert logits.dtype == torch.float32 and logits.shape == (2, 11, cfg.vocab_size)
    expected = reference_logits(model.state_dict(), cfg, ids, use_mup=use_mup)
    torch.testing.assert_close(logits.double(), expected, atol=1e-5, rtol=1e-5)


def test_parameter_names_and_tying():
    tied = MiniCPM(tiny_config(tie_word_embeddings=True))
    untied = MiniCPM(tiny_config(tie_word_embeddings=False))
    layer = {f"layers.0.{n}.weight" for n in (
        "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
        "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    names = {n for n, _ in tied.named_parameters()}
    assert layer <= names and {"embed_tokens.weight", "norm.weight"} <= names
    assert "lm_head.weight" not in names and "lm_head.weight" not in tied.state_dict()
    assert tied.output_weight is tied.embed_tokens.weight
    assert untied.output_weight is untied.lm_head.weight
    assert set(untied.state_dict()) == names | {"lm_head.weight"}


def test_hidden_states_is_final_norm_output_before_logit_scale():
    cfg = tiny_config()
    model = build(cfg)
    ids = random_ids(cfg)
    h = model.hidden_states(ids)
    torch.testing.assert_close(model(ids), (h @ model.output_weight.T) / 4.0)


# -- loss ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_tokens", [None, 5, 7])
@pytest.mark.parametrize("tied", [True, False])
def test_loss_sum_and_gradients_match_reference(chunk_tokens, tied):
    cfg = tiny_config(tie_word_embeddings=tied)
    model = build(cfg)
    ids = random_ids(cfg, seq=12)
    labels = random_ids(cfg, seq=12, seed=2)
    labels[0, :3] = -100
    labels[1, 7] = -100

    loss_sum, num_tokens = model.loss(ids, labels, chunk_tokens=chunk_tokens)
    assert loss_sum.dtype == torch.float32 and loss_sum.ndim == 0
    assert num_tokens.dtype == torch.int64 and int(num_tokens) == 24 - 4
    loss_sum.backward()

    params = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    logits = reference_logits(params, cfg, ids)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss_sum.double(), expected.detach(), atol=1e-4, rtol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad.double(), params[name].grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


def test_loss_chunk_size_attribute_and_custom_ignore_index():
    cfg = tiny_config()
    model = build(cfg, loss_chunk_tokens=3)
    ids = random_ids(cfg, seq=10)
    labels = random_ids(cfg, seq=10, seed=2)
    labels[:, -1] = 5  # a real token id used as the ignore index
    whole, count_whole = model.loss(ids, labels, ignore_index=5, chunk_tokens=10_000)
    chunked, count_chunked = model.loss(ids, labels, ignore_index=5)
    torch.testing.assert_close(chunked, whole)
    assert int(count_whole) == int(count_chunked) == int((labels != 5).sum())


def test_loss_with_every_label_ignored_is_zero():
    cfg = tiny_config()
    model = build(cfg)
    ids = random_ids(cfg)
    labels = torch.full_like(ids, -100)
    loss_sum, num_tokens = model.loss(ids, labels, chunk_tokens=4)
    loss_sum.backward()
    assert loss_sum.detach().item() == 0.0 and int(num_tokens) == 0
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters())


# -- activation checkpointing ---------------------------------------------------------------------------
def test_activation_checkpointing_gives_identical_loss_and_gradients():
    cfg = tiny_config(num_hidden_layers=3)
    ids, labels = random_ids(cfg), random_ids(cfg, seed=2)
    results = []
    for checkpointing in (False, True):
        model = build(cfg, activation_checkpointing=checkpointing)
        model.train()
        loss_sum, _ = model.loss(ids, labels, chunk_tokens=8)
        loss_sum.backward()
        results.append((loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=0, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=0, rtol=0)


# -- mixed precision -----------------------------------------------------------------------------------
def test_bf16_autocast_runs_and_stays_close():
    cfg = tiny_config()
    model = build(cfg)
    ids, labels = random_ids(cfg), random_ids(cfg, seed=2)
    with torch.no_grad():
        reference, _ = model.loss(ids, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
        loss_sum, _ = model.loss(ids, labels, chunk_tokens=8)
    loss_sum.backward()
    assert logits.dtype == torch.float32 and loss_sum.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert abs(loss_sum.item() - reference.item()) < 0.05 * float(reference)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["auto", "sdpa", "eager"])
def test_cuda_bf16_autocast_stays_close_to_fp32(impl):
    cfg = tiny_config(attention_impl=impl)
    model = build(cfg).cuda()
    ids, labels = random_ids(cfg).cuda(), random_ids(cfg, seed=2).cuda()
    with torch.no_grad():
        reference, _ = model.loss(ids, labels)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_sum, _ = model.loss(ids, labels, chunk_tokens=8)
    loss_sum.backward()
    assert loss_sum.dtype == torch.float32
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    assert abs(loss_sum.item() - reference.item()) < 0.05 * float(reference)


def test_rms_norm_rounds_the_normalised_value_to_the_input_dtype():
    from megacpm.model.minicpm import rms_norm
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    gain = torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.5
    wide = x.double()
    normed = (wide / torch.sqrt((wide * wide).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    out = rms_norm(x, gain, 1e-5)
    # The fp32 gain multiplies the bf16-rounded value (recipe section 1), so the result is fp32.
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, gain * normed.float(), atol=0, rtol=2 ** -8)


def module_level_imports(path: str):
    """Top-level module names imported outside any function or class body of a source file."""
    pending, names = list(ast.parse(open(path).read()).body), []
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue  # imports inside these run only when called
        if isinstance(node, ast.Import):
            names += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module.split(".")[0])
        pending += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]
    return names


def test_flash_attn_is_imported_lazily_and_not_on_cpu(monkeypatch):
    import megacpm.model
    package = os.path.dirname(megacpm.model.__file__)
    for file in sorted(os.listdir(package)):
        if file.endswith(".py"):
            assert "flash_attn" not in module_level_imports(os.path.join(package, file)), file

    class ImportSpy:  # records any attempt to find flash_attn during a CPU forward with impl "auto"
        def __init__(self):
            self.attempts = []

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "flash_attn":
                self.attempts.append(name)
            return None

    spy = ImportSpy()
    monkeypatch.setattr(sys, "meta_path", [spy] + sys.meta_path)
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    attention.flash_attn_function.cache_clear()  # an earlier cached lookup would hide an attempt
    cfg = tiny_config(attention_impl="auto")
    build(cfg)(random_ids(cfg))
    assert not spy.attempts
    attention.flash_attn_function()  # the spy does see a real lookup
    assert spy.attempts
    attention.flash_attn_function.cache_clear()


# -- muP init ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("embedding_as_matrix", [True, False])
def test_init_statistics(embedding_as_matrix):
    # m = 256 / 64 = 4: 2-D weights at 0.1 / 2 = 0.05.
    cfg = ModelConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=1024, dim_model_base=64, initializer_range=0.1,
                      tie_word_embeddings=False, mup_embedding_as_matrix=embedding_as_matrix)
    model = build(cfg)
    matrix_std = 0.1 / math.sqrt(4)
    for name, param in model.named_parameters():
        if param.ndim == 1:
            assert torch.equal(param, torch.ones_like(param)), name
            continue
        expected = matrix_std
        if name == "embed_tokens.weight" and not embedding_as_matrix:
            expected = 0.1
        assert abs(param.std().item() / expected - 1) < 0.03, (name, param.std().item(), expected)
        assert abs(param.mean().item()) < 0.1 * expected, name


def test_init_without_mup_uses_initializer_range():
    cfg = ModelConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=1024, dim_model_base=64, use_mup=False)
    model = build(cfg)
    for name, param in model.named_parameters():
        if param.ndim == 2:
            assert abs(param.std().item() / 0.1 - 1) < 0.03, name


def test_init_is_deterministic_given_the_generator():
    cfg = tiny_config(tie_word_embeddings=False)
    a, b, c = build(cfg, seed=7), build(cfg, seed=7), build(cfg, seed=8)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), name


# -- rotary --------------------------------------------------------------------------------------------
def reference_tables(base, head_dim, seq_len):
    half = torch.tensor([base ** (-2 * i / head_dim) for i in range(head_dim // 2)], dtype=torch.float64)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * half[None, :]
    return torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)


@pytest.mark.parametrize("seq_len", [16, 64, 100, 256])
def test_dynamic_ntk_rope_base(seq_len):
    cfg = tiny_config(hidden_size=64, num_attention_heads=4, max_position_embeddings=64, rope_theta=1e6,
                      rope_scaling={"type": "dynamic", "factor": 4.0})
    head_dim, limit, factor = 16, 64, 4.0
    base = 1e6
    if seq_len > limit:
        base = 1e6 * ((factor * seq_len / limit) - (factor - 1)) ** (head_dim / (head_dim - 2))
    cos, sin = RotaryEmbedding(cfg)(seq_len, "cpu")
    assert cos.dtype == torch.float32 and cos.shape == (seq_len, head_dim)
    ref_cos, ref_sin = reference_tables(base, head_dim, seq_len)
    torch.testing.assert_close(cos.double(), ref_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin.double(), ref_sin, atol=1e-5, rtol=0)
    if seq_len > limit:  # and the base really moved: the unscaled table differs
        plain_cos, _ = reference_tables(1e6, head_dim, seq_len)
        assert (cos.double() - plain_cos).abs().max() > 1e-3


def test_rope_without_scaling_ignores_length():
    cfg = tiny_config(max_position_embeddings=32)
    rotary = RotaryEmbedding(cfg)
    short_cos, _ = rotary(16, "cpu")
    long_cos, _ = rotary(128, "cpu")
    torch.testing.assert_close(long_cos[:16], short_cos)
    torch.testing.assert_close(long_cos.double(), reference_tables(10000.0, 16, 128)[0], atol=1e-5, rtol=0)
