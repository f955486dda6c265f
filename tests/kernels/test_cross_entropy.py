"""cross_entropy: the Triton kernels (interpreted) and the torch implementation against fp64 formulas here.

Tolerance rule (tolerance.py): error vs the fp64 truth <= a small multiple of PyTorch's own error in
the input dtype (plain torch ops on the un-upcast logits) plus a small atol; NaN never passes.
"""
import pytest
import torch

from megacpm.kernels import cross_entropy
from megacpm.kernels.cross_entropy import default_block_size
from references import cross_entropy_formula as formula, loss_and_grad
from tolerance import assert_close_to_reference, dtype_atol

IMPLS = ["triton", "torch"]


def make(rows, vocab, dtype, seed=0, ignore=(), spread=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * spread).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    for i in ignore:
        if i < rows:
            labels[i] = -100
    return logits, labels


def check(impl, logits, labels, scale=1 / 9, ignore_index=-100, reduction="mean", z_loss=0.0, block_size=None,
          factor=2.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(labels.shape, generator=g) if reduction == "none" else torch.tensor(1.7)
    kw = dict(logit_scale=scale, ignore_index=ignore_index, reduction=reduction, z_loss=z_loss, impl=impl)
    if impl == "triton":
        kw["block_size"] = block_size
    loss, grad = loss_and_grad(lambda x: cross_entropy(x, labels, **kw), logits, grad_out)
    ref, ref_grad = loss_and_grad(lambda x: formula(x, labels, scale, ignore_index, reduction, z_loss),
                                  logits.double(), grad_out)
    base, base_grad = loss_and_grad(lambda x: formula(x, labels, scale, ignore_index, reduction, z_loss),
                                    logits, grad_out)
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype and grad.shape == logits.shape
    assert loss.shape == (labels.shape if reduction == "none" else ())
    lscale = max(1.0, ref.abs().max().item())
    assert_close_to_reference(loss, ref, base, factor, 4 * dtype_atol(torch.float32, lscale), name=f"{impl} loss")
    gscale = max(1e-3, ref_grad.abs().max().item())
    assert_close_to_reference(grad, ref_grad, base_grad, factor, 4 * dtype_atol(logits.dtype, gscale),
                              name=f"{impl} grad")
    return loss, grad


SHAPES = [(1, 1, None), (3, 7, None), (13, 1000, 256), (3, 4099, 1024), (2, 4099, None)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab,block", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_fp64_reference(impl, dtype, rows, vocab, block, reduction):
    logits, labels = make(rows, vocab, dtype, ignore=(1, 5))
    check(impl, logits, labels, reduction=reduction, block_size=block)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 1 / 9, 2.5])
def test_logit_scale_and_dtypes(impl, dtype, scale):
    logits, labels = make(13, 1000, dtype, seed=3, ignore=(0,), spread=2.0)
    check(impl, logits, labels, scale=scale, block_size=256)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_z_loss(impl, dtype, reduction):
    logits, labels = make(13, 1000, dtype, seed=4, ignore=(2,))
    check(impl, logits, labels, reduction=reduction, z_loss=1e-2, block_size=256)


@pytest.mark.parametrize("impl", IMPLS)
def test_z_loss_changes_the_loss_by_z_lse_squared(impl):
    logits, labels = make(3, 7, torch.float32, seed=5)
    plain = cross_entropy(logits, labels, reduction="sum", impl=impl)
    with_z = cross_entropy(logits, labels, reduction="sum", z_loss=0.1, impl=impl)
    lse = torch.logsumexp(logits.double(), -1)
    torch.testing.assert_close((with_z - plain).double(), 0.1 * (lse * lse).sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_custom_ignore_index_is_a_real_token(impl):
    logits, labels = make(13, 50, torch.float32, seed=6)
    labels[::3] = 7
    check(impl, logits, labels, ignore_index=7, reduction="mean")
    check(impl, logits, labels, ignore_index=7, reduction="none")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch_gives_zero_loss_and_zero_grad(impl, dtype, reduction):
    logits, labels = make(3, 1000, dtype, seed=7)
    labels[:] = -100
    logits = logits.requires_grad_(True)
    loss = cross_entropy(logits, labels, logit_scale=1 / 9, reduction=reduction, impl=impl)
    loss.sum().backward()
    assert not torch.isnan(loss).any() and float(loss.detach().abs().max()) == 0.0
    assert not torch.isnan(logits.grad).any() and float(logits.grad.abs().max()) == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_three_dimensional_and_non_contiguous_logits(impl):
    g = torch.Generator().manual_seed(8)
    base = torch.randn(300, 2 * 3, generator=g) * 3  # logits = base.T viewed [2, 3, 300]: column stride 6
    logits = base.t().reshape(300, 2, 3).permute(1, 2, 0)
    assert not logits.is_contiguous()
    labels = torch.randint(0, 300, (2, 3), generator=g)
    labels[1, 2] = -100
    leaf = logits.detach().clone().requires_grad_(True)
    assert not leaf.is_contiguous()
    out = cross_entropy(leaf, labels, logit_scale=0.5, reduction="none", impl=impl)
    assert out.shape == (2, 3)
    out.sum().backward()
    x64 = logits.detach().double().requires_grad_(True)
    ref = formula(x64.reshape(6, 300), labels.reshape(6), 0.5, -100, "none", 0.0).reshape(2, 3)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    # and a strided (transposed) 2-D view straight into the kernel
    strided = base[:, :6].t()
    assert strided.stride(1) != 1
    lab = labels.reshape(6)
    torch.testing.assert_close(cross_entropy(strided, lab, impl=impl, reduction="none").double(),
                               formula(strided.double(), lab, 1.0, -100, "none", 0.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_label_raises(impl):
    logits, labels = make(3, 7, torch.float32)
    labels[1] = 7
    with pytest.raises((IndexError, RuntimeError)):
        cross_entropy(logits, labels, impl=impl)


def test_bad_arguments():
    logits, labels = make(3, 7, torch.float32)
    with pytest.raises(ValueError):
        cross_entropy(logits, labels, reduction="avg")
    with pytest.raises(ValueError):
        cross_entropy(logits, labels, impl="cuda")


def test_auto_picks_triton_under_the_interpreter(monkeypatch):
    import importlib
    module = importlib.import_module("megacpm.kernels.cross_entropy")  # the package attribute is the function
    calls = []
    original = module.ce_forward
    monkeypatch.setattr(module, "ce_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    logits, labels = make(3, 7, torch.float32)
    cross_entropy(logits, labels)
    assert calls


def test_default_block_size_is_a_bounded_power_of_two():
    for n in (1, 7, 1000, 4099, 122_753, 262_144):
        b = default_block_size(n)
        assert b & (b - 1) == 0 and 16 <= b <= 4096 and (b >= n or b == 4096)


@pytest.mark.parametrize("impl", IMPLS)
def test_int32_labels(impl):
    logits, labels = make(13, 1000, torch.float32, seed=9, ignore=(4,))
    check(impl, logits, labels.to(torch.int32), reduction="mean")
