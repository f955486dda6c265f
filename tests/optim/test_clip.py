"""Gradient clipping against an fp64 norm computed in the test."""
import math

import torch

from megacpm.optim import clip_grad_norm_


def params_with_grads(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((5, 7), (3,), (2, 2, 2))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale
    return params


def fp64_norm(params):
    return torch.cat([p.grad.double().flatten() for p in params]).norm().item()


def test_norm_and_clip_above_max():
    params = params_with_grads(0, scale=10.0)
    before = [p.grad.clone() for p in params]
    reference = fp64_norm(params)
    total = clip_grad_norm_(params, max_norm=1.0)
    assert math.isclose(float(total), reference, rel_tol=1e-6)
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g * (1.0 / reference), rtol=1e-5, atol=1e-7)
    assert math.isclose(fp64_norm(params), 1.0, rel_tol=1e-5)


def test_untouched_below_max_and_when_disabled():
    params = params_with_grads(1, scale=0.01)
    before = [p.grad.clone() for p in params]
    clip_grad_norm_(params, max_norm=1.0)
    big = params_with_grads(2, scale=10.0)
    big_before = [p.grad.clone() for p in big]
    clip_grad_norm_(big, max_norm=0.0)
    for p, g in zip(params + big, before + big_before):
        assert torch.equal(p.grad, g)


def test_non_finite_norm_is_reported_and_grads_untouched():
    params = params_with_grads(3)
    params[1].grad[0] = float("nan")
    before = [p.grad.clone() for p in params]
    total = clip_grad_norm_(params, max_norm=1.0)
    assert not torch.isfinite(total)
    for p, g in zip(params, before):
        assert torch.equal(torch.nan_to_num(p.grad), torch.nan_to_num(g))


def test_reducer_sees_the_sum_of_squares():
    params = params_with_grads(4)
    seen = []
    total = clip_grad_norm_(params, 0.0, norm_reducer=lambda sq: (seen.append(float(sq)), sq * 4)[1])
    assert math.isclose(seen[0], fp64_norm(params) ** 2, rel_tol=1e-5)
    assert math.isclose(float(total), 2 * fp64_norm(params), rel_tol=1e-5)
