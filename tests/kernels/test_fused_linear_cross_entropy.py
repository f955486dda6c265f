"""fused_linear_cross_entropy (Triton CE kernel interpreted, and the torch path) against fp64 formulas here.

The baseline for the tolerance rule is plain PyTorch in the same precision: logits = hidden @ weight.T in
the matmul dtype (the hidden's, with the weight cast to it), cross entropy of the fp32 logits.
"""
import importlib

import pytest
import torch

from megacpm.kernels import cross_entropy, fused_linear_cross_entropy
from tolerance import assert_close_to_reference, dtype_atol

flce_module = importlib.import_module("megacpm.kernels.fused_linear_cross_entropy")
IMPLS = ["triton", "torch"]


def make(tokens, hidden_size, vocab, h_dtype, w_dtype, seed=0, ignore=()):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(tokens, hidden_size, generator=g)).to(h_dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.5).to(w_dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    for i in ignore:
        if i < tokens:
            labels[i] = -100
    return hidden, weight, labels


def formula(hidden, weight, labels, scale, ignore_index, reduction, z_loss, matmul_dtype=None):
    if matmul_dtype is not None:  # the baseline: matmul in the low precision, CE on the fp32 logits
        logits = (hidden.to(matmul_dtype) @ weight.to(matmul_dtype).t()).float()
    else:
        logits = hidden @ weight.t()
    x = logits * scale
    lse = torch.logsumexp(x, dim=-1)
    valid = labels != ignore_index
    target = x.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    loss = torch.where(valid, lse - target + z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def run(fn, hidden, weight, grad_out):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    loss = fn(hidden, weight)
    grad_h, grad_w = torch.autograd.grad(loss, (hidden, weight), grad_out.to(loss.dtype))
    return loss.detach(), grad_h, grad_w


def check(impl, hidden, weight, labels, scale=1 / 9, reduction="mean", z_loss=0.0, chunk_tokens=None,
          factor=2.0, ignore_index=-100):
    g = torch.Generator().manual_seed(11)
    grad_out = torch.randn(labels.shape, generator=g) if reduction == "none" else torch.tensor(1.3)
    kw = dict(logit_scale=scale, ignore_index=ignore_index, reduction=reduction, z_loss=z_loss, impl=impl,
              chunk_tokens=chunk_tokens)
    loss, gh, gw = run(lambda h, w: fused_linear_cross_entropy(h, w, labels, **kw), hidden, weight, grad_out)
    args = (labels, scale, ignore_index, reduction, z_loss)
    ref, rgh, rgw = run(lambda h, w: formula(h, w, *args), hidden.double(), weight.double(), grad_out)
    base, bgh, bgw = run(lambda h, w: formula(h, w, *args, matmul_dtype=hidden.dtype), hidden, weight, grad_out)
    assert loss.dtype == torch.float32 and loss.shape == (labels.shape if reduction == "none" else ())
    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    assert gh.shape == hidden.shape and gw.shape == weight.shape
    mm_dtype = hidden.dtype
    lscale = max(1.0, ref.abs().max().item())
    assert_close_to_reference(loss, ref, base, factor, 4 * dtype_atol(torch.float32, lscale), name=f"{impl} loss")
    # The gradients come out of matmuls whose summation order (chunking, BLAS blocking) differs from the
    # baseline's: allow ~sqrt(reduction length) fp32 ulps on top of a ulp of the matmul dtype.
    length = max(weight.shape[0], labels.numel())
    for name, out, b, r in (("grad hidden", gh, bgh, rgh), ("grad weight", gw, bgw, rgw)):
        gscale = max(1e-3, r.abs().max().item())
        atol = 4 * dtype_atol(mm_dtype, gscale) + length ** 0.5 * dtype_atol(torch.float32, gscale)
        assert_close_to_reference(out, r, b, factor, atol, name=f"{impl} {name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_tokens", [None, 4, 5, 13])
def test_fp32_matches_fp64_reference_with_several_chunks(impl, reduction, chunk_tokens):
    hidden, weight, labels = make(13, 16, 1000, torch.float32, torch.float32, ignore=(0, 6))
    check(impl, hidden, weight, labels, reduction=reduction, chunk_tokens=chunk_tokens)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("vocab", [1, 7, 4099])
def test_odd_vocab_sizes(impl, vocab):
    hidden, weight, labels = make(3, 8, vocab, torch.float32, torch.float32, seed=1, ignore=(1,))
    check(impl, hidden, weight, labels, chunk_tokens=2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_hidden_with_fp32_or_bf16_weight(impl, w_dtype, reduction):
    hidden, weight, labels = make(13, 32, 1000, torch.bfloat16, w_dtype, seed=2, ignore=(3,))
    check(impl, hidden, weight, labels, reduction=reduction, chunk_tokens=4)


@pytest.mark.parametrize("impl", IMPLS)
def test_z_loss_and_scale(impl):
    hidden, weight, labels = make(13, 16, 1000, torch.float32, torch.float32, seed=3, ignore=(2,))
    check(impl, hidden, weight, labels, scale=2.0, z_loss=1e-2, chunk_tokens=5)


@pytest.mark.parametrize("impl", IMPLS)
def test_same_as_cross_entropy_on_the_full_logits(impl):
    hidden, weight, labels = make(13, 16, 300, torch.float32, torch.float32, seed=4, ignore=(5,))
    labels = labels.reshape(13)
    fused = fused_linear_cross_entropy(hidden.reshape(1, 13, 16), weight, labels.reshape(1, 13), logit_scale=0.25,
                                       reduction="none", impl=impl, chunk_tokens=3)
    assert fused.shape == (1, 13)
    plain = cross_entropy(hidden @ weight.t(), labels, logit_scale=0.25, reduction="none", impl=impl)
    torch.testing.assert_close(fused.reshape(13), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch_gives_zero_loss_and_zero_grads(impl, reduction):
    hidden, weight, labels = make(5, 8, 100, torch.float32, torch.float32)
    labels[:] = -100
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, impl=impl, chunk_tokens=2)
    loss.sum().backward()
    assert not torch.isnan(loss).any() and float(loss.detach().abs().max()) == 0.0
    for grad in (hidden.grad, weight.grad):
        assert not torch.isnan(grad).any() and float(grad.abs().max()) == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_only_the_needed_gradient_and_no_grad(impl):
    hidden, weight, labels = make(6, 8, 50, torch.float32, torch.float32, seed=5)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, impl=impl, chunk_tokens=4)
    ref = formula(hidden.double(), weight.double(), labels, 1.0, -100, "mean", 0.0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    w = weight.clone().requires_grad_(True)
    fused_linear_cross_entropy(hidden, w, labels, impl=impl, chunk_tokens=4).backward()
    w64 = weight.double().requires_grad_(True)
    formula(hidden.double(), w64, labels, 1.0, -100, "mean", 0.0).backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_matmul_in_bf16_gradients_in_the_parameters_dtype(impl):
    hidden, weight, labels = make(13, 32, 500, torch.float32, torch.float32, seed=6, ignore=(1,))
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, labels, logit_scale=1 / 9, impl=impl, chunk_tokens=4)
    loss.backward()
    assert loss.dtype == torch.float32
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    base = formula(h, w, labels, 1 / 9, -100, "mean", 0.0, matmul_dtype=torch.bfloat16)
    base.backward()
    # the same bf16 matmuls as plain PyTorch under autocast: close to that, not to the fp32 result
    torch.testing.assert_close(loss, base.detach(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(weight.grad, w.grad, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(hidden.grad, h.grad, rtol=2e-2, atol=2e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_int32_labels(impl):
    hidden, weight, labels = make(7, 8, 100, torch.float32, torch.float32, seed=7, ignore=(2,))
    check(impl, hidden, weight, labels.to(torch.int32), chunk_tokens=3)


def test_default_chunk_bounds_the_logits():
    for tokens, vocab in ((16384, 122_753), (8192, 262_144), (10, 7), (100_000, 1)):
        chunk = flce_module.default_chunk_tokens(tokens, vocab)
        assert 1 <= chunk <= tokens
        assert chunk * vocab <= max(flce_module.MAX_CHUNK_ELEMENTS, vocab)


def test_chunks_never_hold_more_than_chunk_tokens_rows_of_logits(monkeypatch):
    seen = []
    original = flce_module.ce_forward

    def spy(logits, *args, **kwargs):
        seen.append(tuple(logits.shape))
        return original(logits, *args, **kwargs)

    monkeypatch.setattr(flce_module, "ce_forward", spy)
    hidden, weight, labels = make(13, 8, 64, torch.float32, torch.float32)
    fused_linear_cross_entropy(hidden, weight, labels, impl="triton", chunk_tokens=4)
    assert seen == [(4, 64), (4, 64), (4, 64), (1, 64)]


def test_minicpm_loss_runs_the_fused_kernel_and_matches_fp64():
    from megacpm.config import ModelConfig
    from megacpm.model import MiniCPM

    cfg = ModelConfig()
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 32, 48, 1
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size, cfg.dim_model_base = 4, 2, 64, 8
    model = MiniCPM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 6), generator=g)
    labels = torch.randint(0, 64, (2, 6), generator=g)
    labels[0, 0] = -100
    loss_sum, count = model.loss(ids, labels, chunk_tokens=5)
    loss_sum.backward()
    assert int(count) == 11
    h = model.hidden_states(ids).detach().flatten(0, 1).double()
    w = model.output_weight.detach().double().requires_grad_(True)
    ref = formula(h, w, labels.reshape(-1), 1 / cfg.width_mult, -100, "sum", 0.0)
    torch.testing.assert_close(loss_sum.double(), ref.detach(), rtol=1e-5, atol=1e-5)
