"""Grouped GEMM (impl="triton", interpreted, and impl="torch") against an fp64 per-expert loop written here.

The interpreter's tiles are 16 x 16 x 16 (kernels.grouped_gemm.INTERPRETER_BLOCKS), so the shapes below
cover groups of several row tiles, a group ending exactly on a tile boundary, groups with one row,
empty groups (first, middle, last), one group holding every row, N and K spanning several tiles and
not dividing them, and no rows at all.
"""
import pytest
import torch
import torch.nn.functional as F

from megacpm.kernels import grouped_gemm as gg
from megacpm.kernels import grouped_matmul
from megacpm.model.moe import grouped_swiglu
from tolerance import assert_close_to_reference, dtype_atol


def reference(x, weight, counts, dy):
    """fp64 truth per group: y_e = x_e @ W_e^T, dx_e = dy_e @ W_e, dW_e = dy_e^T @ x_e (0 without rows)."""
    x64, w64, dy64 = x.detach().double(), weight.detach().double(), dy.detach().double()
    y = torch.zeros(x.shape[0], weight.shape[1], dtype=torch.float64)
    dx = torch.zeros_like(x64)
    dw = torch.zeros_like(w64)
    start = 0
    for e, count in enumerate(counts.tolist()):
        rows = slice(start, start + count)
        y[rows] = x64[rows] @ w64[e].t()
        dx[rows] = dy64[rows] @ w64[e]
        dw[e] = dy64[rows].t() @ x64[rows]
        start += count
    return y, dx, dw


def run(impl, x, weight, counts, dy):
    x = x.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    y = grouped_matmul(x, weight, counts, impl=impl)
    dx, dw = torch.autograd.grad(y, (x, weight), dy.to(y.dtype))
    return y, dx, dw


def make(counts, k, n, dtype, seed=0):
    counts = torch.tensor(counts, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    rows = int(counts.sum())
    x = torch.randn(rows, k, generator=g).to(dtype)
    weight = (torch.randn(len(counts), n, k, generator=g) / k ** 0.5).to(dtype)
    dy = torch.randn(rows, n, generator=g).to(dtype)  # in the output's dtype, so the truth sees the same dy
    return x, weight, counts, dy


def check_all(x, weight, counts, dy, factor=2.0):
    refs = reference(x, weight, counts, dy)
    torch_out = run("torch", x, weight, counts, dy)
    kernel_out = run("triton", x, weight, counts, dy)
    dtype = x.dtype
    for name, k, t, ref, reduce_len in zip(("y", "dx", "dweight"), kernel_out, torch_out, refs,
                                           (x.shape[1], weight.shape[1], x.shape[0])):
        assert k.dtype == t.dtype == dtype and k.shape == t.shape == ref.shape, (name, k.dtype, k.shape)
        scale = max(1.0, ref.abs().max().item())
        # PyTorch itself: one rounding to the dtype plus fp32 accumulation over reduce_len terms.
        ulp = torch.finfo(dtype).eps
        assert_close_to_reference(t, ref, atol=(1 + reduce_len * 2 ** -20 / ulp) * ulp * scale, name=f"torch {name}")
        # The kernel: at most factor x PyTorch's error, plus a quarter ulp (fp32: plus the accumulation order).
        slack = dtype_atol(dtype, scale) + (reduce_len * 2 ** -22 * scale if dtype == torch.float32 else 0.0)
        assert_close_to_reference(k, ref, t, factor, slack, name=f"triton {name}")


COUNTS = {
    "ragged": [5, 0, 23, 1, 0, 16, 11],  # several tiles, one row, empty groups, a tile-boundary end
    "one-group-all-rows": [0, 0, 37, 0],
    "empty-first-and-last": [0, 3, 32, 0],
    "single-group": [19],
}


@pytest.mark.parametrize("case", sorted(COUNTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradients_against_the_per_expert_loop(case, dtype):
    x, weight, counts, dy = make(COUNTS[case], k=20, n=37, dtype=dtype, seed=len(case))
    check_all(x, weight, counts, dy)


def test_fp16_and_small_k_n():
    x, weight, counts, dy = make([3, 0, 18, 2], k=7, n=5, dtype=torch.float16, seed=3)
    check_all(x, weight, counts, dy)


def test_empty_groups_get_zero_weight_gradients():
    x, weight, counts, dy = make([0, 9, 0, 4, 0], k=17, n=6, dtype=torch.float32, seed=4)
    _, _, dw = run("triton", x, weight, counts, dy)
    assert torch.equal(dw[0], torch.zeros_like(dw[0])) and torch.equal(dw[2], torch.zeros_like(dw[2]))
    assert torch.equal(dw[4], torch.zeros_like(dw[4]))
    assert dw[1].abs().sum() > 0 and dw[3].abs().sum() > 0


def test_no_rows_at_all():
    for impl in ("triton", "torch"):
        x, weight, counts, dy = make([0, 0, 0], k=8, n=5, dtype=torch.float32)
        y, dx, dw = run(impl, x, weight, counts, dy)
        assert y.shape == (0, 5) and dx.shape == (0, 8)
        assert torch.equal(dw, torch.zeros_like(weight)), impl


def test_strided_inputs_and_a_broadcast_output_gradient():
    """Non-contiguous x and weight (the kernels take strides), and dy with stride 0 (from a .sum())."""
    x, weight, counts, _ = make([6, 0, 21], k=18, n=19, dtype=torch.float32, seed=5)
    wide = torch.randn(x.shape[0], 40)
    wide[:, 3:21] = x
    x_view = wide[:, 3:21]
    w_view = weight.transpose(1, 2).contiguous().transpose(1, 2)  # [E, N, K] with K the slow dimension
    assert not x_view.is_contiguous() and not w_view.is_contiguous()
    dy = torch.ones(x.shape[0], 19)
    check_all(x_view, w_view, counts, dy)
    xs = x_view.clone().requires_grad_(True)
    ws = w_view.clone().requires_grad_(True)
    grouped_matmul(xs, ws, counts, impl="triton").sum().backward()  # dy = ones expanded: stride 0
    _, dx_ref, dw_ref = reference(x, weight, counts, dy)
    assert_close_to_reference(xs.grad, dx_ref, atol=1e-5)
    assert_close_to_reference(ws.grad, dw_ref, atol=1e-5)


def test_only_x_or_only_weight_needs_grad():
    x, weight, counts, dy = make([4, 0, 13], k=9, n=11, dtype=torch.float32, seed=6)
    _, dx_ref, dw_ref = reference(x, weight, counts, dy)
    xg = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(grouped_matmul(xg, weight, counts, impl="triton"), (xg,), dy)
    assert_close_to_reference(dx, dx_ref, atol=1e-5)
    wg = weight.clone().requires_grad_(True)
    (dw,) = torch.autograd.grad(grouped_matmul(x, wg, counts, impl="triton"), (wg,), dy)
    assert_close_to_reference(dw, dw_ref, atol=1e-5)


def test_int32_counts():
    x, weight, counts, dy = make([2, 0, 17], k=5, n=6, dtype=torch.float32, seed=8)
    y = grouped_matmul(x, weight, counts.to(torch.int32), impl="triton")
    assert_close_to_reference(y, reference(x, weight, counts, dy)[0], atol=1e-5)


def test_group_metadata_and_row_tile_bound():
    """The metadata the kernels search: row and tile starts/ends; the grid bound covers any counts."""
    meta = gg._group_meta(torch.tensor([5, 0, 23, 16]), 16, 44)
    assert meta.tolist() == [[0, 5, 5, 28], [5, 5, 28, 44], [0, 1, 1, 3], [1, 1, 3, 4]]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        e = int(torch.randint(1, 9, (1,), generator=g))
        counts = torch.randint(0, 40, (e,), generator=g)
        tiles = int(((counts + 15) // 16).sum())
        assert tiles <= gg._row_tiles_bound(int(counts.sum()), e, 16)


def test_mismatches_raise_one_value_error_naming_the_shapes():
    x, weight, counts, _ = make([3, 4], k=6, n=5, dtype=torch.float32)
    cases = [
        (torch.randn(7, 8), weight, counts, r"K \(6\) is not x's \(8\)"),
        (x, weight, torch.tensor([3, 4, 0]), r"counts has 3 groups, weight 2"),
        (x.to(torch.bfloat16), weight, counts, r"same dtype"),
        (x, weight, torch.tensor([3, 3]), r"counts sum to 6, x has 7 rows"),
        (x, weight, torch.tensor([8, -1]), r"negative counts"),
        (x, weight, counts.float(), r"integer"),
        (x, weight[0], counts, r"expected x \[rows, K\], weight \[E, N, K\]"),
    ]
    for xi, wi, ci, what in cases:
        for impl in ("triton", "torch", "auto"):
            with pytest.raises(ValueError, match=what) as info:
                grouped_matmul(xi, wi, ci, impl=impl)
            message = str(info.value)
            assert f"x {tuple(xi.shape)}" in message and f"weight {tuple(wi.shape)}" in message
            assert f"counts {tuple(ci.shape)}" in message


def test_auto_dispatch(monkeypatch):
    """auto: the kernel under the interpreter, torch for fp64 and once TRITON_INTERPRET is not 1."""
    calls = []
    apply = gg.GroupedMatmulFunction.apply
    monkeypatch.setattr(gg.GroupedMatmulFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    x, weight, counts, _ = make([2, 3], k=4, n=3, dtype=torch.float32)
    grouped_matmul(x, weight, counts)
    assert calls == [1]
    y64 = grouped_matmul(x.double(), weight.double(), counts)
    assert calls == [1] and y64.dtype == torch.float64
    with pytest.raises(TypeError):
        grouped_matmul(x.double(), weight.double(), counts, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    grouped_matmul(x, weight, counts)
    assert calls == [1]
    with pytest.raises(RuntimeError):
        grouped_matmul(x, weight, counts, impl="triton")


def test_autocast_casts_both_inputs_and_returns_gradients_in_their_dtypes():
    x, weight, counts, dy = make([5, 0, 12], k=10, n=7, dtype=torch.float32, seed=9)
    outs = {}
    for impl in ("triton", "torch"):
        xg, wg = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = grouped_matmul(xg, wg, counts, impl=impl)
        assert y.dtype == torch.bfloat16
        dx, dw = torch.autograd.grad(y, (xg, wg), dy.to(torch.bfloat16))
        assert dx.dtype == dw.dtype == torch.float32
        outs[impl] = (y, dx, dw)
    for k, t in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(k.float(), t.float(), rtol=2 ** -7, atol=2 ** -7)


def test_grouped_swiglu_runs_the_kernel_and_matches_a_per_expert_loop():
    """megacpm.model.moe.grouped_swiglu (impl auto: the kernel here) against fp64 SwiGLU per expert."""
    h, inter = 12, 20
    counts = torch.tensor([4, 0, 17, 1])
    g = torch.Generator().manual_seed(10)
    x = torch.randn(int(counts.sum()), h, generator=g, requires_grad=True)
    w1, w3 = (torch.randn(4, inter, h, generator=g).mul_(0.3).requires_grad_() for _ in range(2))
    w2 = torch.randn(4, h, inter, generator=g).mul_(0.3).requires_grad_()
    out = grouped_swiglu(x, counts, w1, w3, w2)
    leaves = (x, w1, w3, w2)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    x64, a64, b64, c64 = doubles
    pieces, start = [], 0
    for e, count in enumerate(counts.tolist()):
        rows = x64[start:start + count]
        pieces.append((F.silu(rows @ a64[e].t()) * (rows @ b64[e].t())) @ c64[e].t())
        start += count
    want = torch.cat(pieces)
    refs = torch.autograd.grad(want.square().sum(), doubles)
    assert_close_to_reference(out, want, atol=1e-5)
    for name, got, ref in zip(("x", "w1", "w3", "w2"), grads, refs):
        assert_close_to_reference(got, ref, atol=1e-4 * max(1.0, ref.abs().max().item()), name=f"d{name}")


def test_programs_write_only_their_groups_rows():
    """A tile writes only the rows of its group: with group metadata leaving gaps between and after the
    groups (rows of no group, as counts summing to fewer than x's rows on CUDA would), the gaps keep
    their NaN. (With gapless metadata a spill past a group's end would go unseen here: the interpreter
    runs programs in order, and the next group's tiles overwrite the spill with the right values.)"""
    x, weight, _, _ = make([40, 0, 0], k=9, n=21, dtype=torch.float32, seed=11)
    groups = [(0, 3), (10, 14), (14, 31)]  # [start, end) rows of each group; rows 3..9 and 31..39 of none
    tiles = [-(-(end - start) // 16) for start, end in groups]
    tile_end = torch.tensor(tiles).cumsum(0)
    meta = torch.stack((torch.tensor([s for s, _ in groups]), torch.tensor([e for _, e in groups]),
                        tile_end - torch.tensor(tiles), tile_end)).contiguous()
    out = torch.full((x.shape[0], 21), float("nan"))
    gg._grouped_mm(x, weight, (weight.stride(0), weight.stride(2), weight.stride(1)), 9, 21, meta,
                   torch.float32, gg.INTERPRETER_BLOCKS, out=out)
    inside = torch.zeros(x.shape[0], dtype=torch.bool)
    for group, (start, end) in enumerate(groups):
        inside[start:end] = True
        want = x[start:end].double() @ weight[group].double().t()
        assert_close_to_reference(out[start:end], want, atol=1e-5, name=f"group {group}")
    assert torch.isnan(out[~inside]).all()
