"""Gradient clipping against an fp64 norm computed in the test."""
import math

import torch

from megacpm.optim import clip_grad_norm_


def params_with_grads(seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in ((5, 7), (3,), (2, 2, 2))]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(dtype)
    return params


def fp64_norm(params):
    grads = [p.grad.double().flatten() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.cat(grads)).item()


def test_norm_and_clip_above_max():
    params = params_with_grads(0, scale=10.0)
    before = [p.grad.clone() for p in params]
    reference = fp64_norm(params)
    assert reference > 1.0
    total = clip_grad_norm_(params, max_norm=1.0)
    assert total.dtype == torch.float32 and total.dim() == 0
    assert math.isclose(float(total), reference, rel_tol=1e-6)
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g * (1.0 / reference), rtol=1e-5, atol=1e-7)
    assert math.isclose(fp64_norm(params), 1.0, rel_tol=1e-5)


def test_params_without_grads_are_skipped():
    params = params_with_grads(5, scale=10.0)
    params.append(torch.nn.Parameter(torch.ones(4)))  # no .grad
    reference = fp64_norm(params)
    total = clip_grad_norm_(iter(params), max_norm=2.0)  # a generator, like model.parameters()
    assert math.isclose(float(total), reference, rel_tol=1e-6)
    assert params[-1].grad is None
    assert math.isclose(fp64_norm(params), 2.0, rel_tol=1e-5)


def test_bf16_grads_give_an_fp32_norm():
    params = params_with_grads(6, scale=3.0, dtype=torch.bfloat16)
    total = clip_grad_norm_(params, max_norm=0.0)
    assert total.dtype == torch.float32
    assert math.isclose(float(total), fp64_norm(params), rel_tol=1e-6)  # same bf16 values, exact sum


def test_untouched_below_max_and_when_disabled():
    params = params_with_grads(1, scale=0.01)
    before = [p.grad.clone() for p in params]
    clip_grad_norm_(params, max_norm=1.0)
    big = params_with_grads(2, scale=10.0)
    big_before = [p.grad.clone() for p in big]
    total = clip_grad_norm_(big, max_norm=0.0)
    assert math.isclose(float(total), fp64_norm(big), rel_tol=1e-6)
    for p, g in zip(params + big, before + big_before):
        assert torch.equal(p.grad, g)


def test_zero_gradients_and_no_gradients():
    zero = torch.nn.Parameter(torch.ones(3))
    zero.grad = torch.zeros(3)
    assert float(clip_grad_norm_([zero], 1.0)) == 0.0 and torch.equal(zero.grad, torch.zeros(3))
    assert float(clip_grad_norm_([torch.nn.Parameter(torch.ones(3))], 1.0)) == 0.0


def test_non_finite_norm_is_reported_and_grads_untouched():
    for bad in (float("nan"), float("inf")):
        params = params_with_grads(3)
        params[1].grad[0] = bad
        before = [p.grad.clone() for p in params]
        total = clip_grad_norm_(params, max_norm=1.0)
        assert not torch.isfinite(total)
        for p, g in zip(params, before):
            assert torch.equal(p.grad.isnan(), g.isnan())
            assert torch.equal(torch.nan_to_num(p.grad), torch.nan_to_num(g))


def test_reducer_sees_the_sum_of_squares():
    params = params_with_grads(4)
    seen = []

    def reducer(squares):  # as if three other ranks held the same gradients
        seen.append(float(squares))
        return squares * 4

    total = clip_grad_norm_(params, 0.0, norm_reducer=reducer)
    assert math.isclose(seen[0], fp64_norm(params) ** 2, rel_tol=1e-5)
    assert math.isclose(float(total), 2 * fp64_norm(params), rel_tol=1e-5)


def test_reducer_is_called_on_a_rank_without_gradients():
    # The reducer may be a collective: every rank must take part.
    total = clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0,
                            norm_reducer=lambda squares: squares + 9.0)
    assert float(total) == 3.0
