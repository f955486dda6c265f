"""The Triton paths of RMSNorm and rotary as torch.library custom ops (megacpm::rms_norm_forward,
megacpm::rms_norm_backward, megacpm::rotary), run under Triton's CPU interpreter.

- torch.library.opcheck on each op: schema, fake-tensor (shapes, dtypes, strides, devices of the real
  outputs), autograd registration and AOT dispatch; rotary with tables shared by the batch and with
  per-row [batch, seq, D / 2] tables;
- a function of rms_norm and rotary with impl="triton" compiled with fullgraph=True (no graph break)
  holds the custom ops as graph nodes, launches the kernels, and matches the eager torch
  implementations (forward and input gradients) within the kernel tests' fp32 tolerance; the same for
  rotary with per-row tables;
- dweight is computed only when weight needs a gradient, eager and compiled;
- without triton the kernels modules still import and register the ops (fake and autograd need no
  triton); running an op then raises.
"""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch._dynamo.testing

from megacpm.kernels import rms_norm, rotary
from megacpm.kernels.rms_norm import rms_norm_backward_op, rms_norm_forward_op, rms_norm_torch
from megacpm.kernels.rotary import rotary_op, rotary_torch
from tolerance import assert_close_to_reference, dtype_atol

# The modules themselves: megacpm.kernels.rms_norm / .rotary as attributes are the functions.
rms_norm_module = importlib.import_module("megacpm.kernels.rms_norm")
rotary_module = importlib.import_module("megacpm.kernels.rotary")

EPS = 1e-5
BATCH, SEQ, HEADS, HEAD_DIM = 2, 3, 2, 4
HIDDEN = HEADS * HEAD_DIM
OFFSET = 1


def randn(*shape, seed, scale=1.0, requires_grad=False):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    return t.requires_grad_(requires_grad)


def tables(n_positions, half):
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * (0.3 ** torch.arange(half))[None, :]
    return angles.cos().float(), angles.sin().float()


# --------------------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------------------
def test_opcheck_rms_norm_forward():
    weight = (1 + 0.5 * randn(HIDDEN, seed=1)).requires_grad_(True)
    x = randn(BATCH, SEQ, HIDDEN, seed=0, scale=3, requires_grad=True)
    torch.library.opcheck(rms_norm_forward_op, (x, weight, EPS))
    strided = randn(HIDDEN, 5, seed=2).t().requires_grad_(True)  # [5, HIDDEN], not contiguous
    torch.library.opcheck(rms_norm_forward_op, (strided, weight, EPS))
    # The fake outputs are what the real op returns: y in x's shape, rstd fp32 [rows].
    y, rstd = rms_norm_forward_op(x.detach(), weight.detach(), EPS)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.is_contiguous()
    assert rstd.shape == (BATCH * SEQ,) and rstd.dtype == torch.float32


@pytest.mark.parametrize("need_dweight", [True, False])
def test_opcheck_rms_norm_backward(need_dweight):
    x, weight = randn(BATCH, SEQ, HIDDEN, seed=3, scale=3), 1 + 0.5 * randn(HIDDEN, seed=4)
    _, rstd = rms_norm_forward_op(x, weight, EPS)
    dy = randn(BATCH, SEQ, HIDDEN, seed=5)
    torch.library.opcheck(rms_norm_backward_op, (dy, x, weight, rstd, need_dweight))
    dx, dweight = rms_norm_backward_op(dy, x, weight, rstd, need_dweight)
    assert dx.shape == x.shape
    assert dweight.shape == ((HIDDEN,) if need_dweight else (0,))


@pytest.mark.parametrize("backward", [False, True])
def test_opcheck_rotary(backward):
    cos, sin = tables(SEQ + OFFSET, HEAD_DIM // 2)
    x = randn(BATCH, SEQ, HEADS, HEAD_DIM, seed=6, requires_grad=True)
    torch.library.opcheck(rotary_op, (x, cos, sin, OFFSET, backward))
    strided = randn(BATCH, HEADS, SEQ, HEAD_DIM, seed=7).transpose(1, 2).requires_grad_(True)
    torch.library.opcheck(rotary_op, (strided, cos, sin, 0, backward))


@pytest.mark.parametrize("backward", [False, True])
def test_opcheck_rotary_per_row_tables(backward):
    cos, sin = tables(SEQ + 2, HEAD_DIM // 2)
    ids = torch.tensor([[0, 1, 0], [2, 0, 1]])  # per-token positions [BATCH, SEQ], restarting
    cos3, sin3 = cos[ids], sin[ids]
    x = randn(BATCH, SEQ, HEADS, HEAD_DIM, seed=8, requires_grad=True)
    torch.library.opcheck(rotary_op, (x, cos3, sin3, 0, backward))
    strided = randn(BATCH, HEADS, SEQ, HEAD_DIM, seed=9).transpose(1, 2).requires_grad_(True)
    torch.library.opcheck(rotary_op, (strided, cos3.transpose(0, 1).contiguous().transpose(0, 1), sin3, 0, backward))
    with pytest.raises(ValueError, match="position_offset"):
        rotary_op(x.detach(), cos3, sin3, 1, backward)


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------
def block(x, weight, cos, sin, impl):
    """A decoder block's use of the kernels: a norm, then the rotation of its output as heads."""
    h = rms_norm(x, weight, EPS, impl=impl)
    return rotary(h.view(*x.shape[:-1], HEADS, HEAD_DIM), cos, sin, impl=impl, position_offset=OFFSET)


def torch_block(x, weight, cos, sin):
    h = rms_norm_torch(x, weight, EPS)
    return rotary_torch(h.view(*x.shape[:-1], HEADS, HEAD_DIM), cos, sin, position_offset=OFFSET)


def outputs_and_grads(fn, x, weight, cos, sin, probe):
    x = x.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    out = fn(x, weight, cos, sin)
    dx, dweight = torch.autograd.grad(out, (x, weight), probe.to(out.dtype))
    return out.detach(), dx, dweight


def count_launches(monkeypatch):
    launches = {"rms_norm_forward": 0, "rms_norm_backward": 0, "rotary": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            launches[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(rms_norm_module, "rms_norm_forward",
                        counting("rms_norm_forward", rms_norm_module.rms_norm_forward))
    monkeypatch.setattr(rms_norm_module, "rms_norm_backward",
                        counting("rms_norm_backward", rms_norm_module.rms_norm_backward))
    monkeypatch.setattr(rotary_module, "rotary_launch", counting("rotary", rotary_module.rotary_launch))
    return launches


def test_compiled_block_has_no_graph_break_and_matches_torch(monkeypatch):
    torch._dynamo.reset()

    def fn(x, weight, cos, sin):
        return block(x, weight, cos, sin, "triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    launches = count_launches(monkeypatch)
    # A second sequence length recompiles with dynamic shapes: the fake implementations see SymInts.
    for seq in (SEQ, SEQ + 2):
        x = randn(BATCH, seq, HIDDEN, seed=10 + seq, scale=3)
        weight = 1 + 0.5 * randn(HIDDEN, seed=11)
        cos, sin = tables(seq + OFFSET, HEAD_DIM // 2)
        probe = randn(BATCH, seq, HEADS, HEAD_DIM, seed=12)

        for key in launches:
            launches[key] = 0
        out_c, dx_c, dw_c = outputs_and_grads(compiled, x, weight, cos, sin, probe)
        # The kernels ran: the forward of each, the rms_norm backward and the rotary backward.
        assert launches == {"rms_norm_forward": 1, "rms_norm_backward": 1, "rotary": 2}, launches

        out_t, dx_t, dw_t = outputs_and_grads(torch_block, x, weight, cos, sin, probe)
        out_64, dx_64, dw_64 = outputs_and_grads(torch_block, x.double(), weight.double(), cos.double(),
                                                 sin.double(), probe.double())
        for name, compiled_value, torch_value, truth in (("output", out_c, out_t, out_64), ("dx", dx_c, dx_t, dx_64),
                                                         ("dweight", dw_c, dw_t, dw_64)):
            assert compiled_value.dtype == torch_value.dtype == torch.float32
            assert compiled_value.shape == torch_value.shape
            scale = max(1.0, truth.abs().max().item())
            assert_close_to_reference(compiled_value, truth, torch_value, 2.0,
                                      dtype_atol(torch.float32, scale) + 1e-6 * scale,
                                      name=f"compiled {name} (seq {seq})")

    # One graph per compilation, with the custom ops as its nodes (nothing traced into a launcher).
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch.compile(fn, fullgraph=True, backend=counter)(x, weight, cos, sin)
    assert counter.frame_count == 1, counter.frame_count
    targets = {str(node.target) for node in counter.graphs[0].graph.nodes if node.op == "call_function"}
    assert {"megacpm.rms_norm_forward.default", "megacpm.rotary.default"} <= targets, targets


def test_compiled_rotary_with_per_row_tables(monkeypatch):
    """fullgraph=True with 3-D tables gathered inside the compiled function: the op is a graph node, the
    kernel runs forward and backward, and the result matches the torch path."""
    torch._dynamo.reset()

    def fn(x, cos, sin, ids):
        return rotary(x, cos[ids], sin[ids], impl="triton")

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    launches = count_launches(monkeypatch)
    cos, sin = tables(SEQ + 2, HEAD_DIM // 2)
    ids = torch.tensor([[0, 1, 0], [2, 0, 1]])
    x = randn(BATCH, SEQ, HEADS, HEAD_DIM, seed=13, requires_grad=True)
    probe = randn(BATCH, SEQ, HEADS, HEAD_DIM, seed=14)
    out = compiled(x, cos, sin, ids)
    (dx,) = torch.autograd.grad(out, (x,), probe)
    assert launches["rotary"] == 2, launches
    assert counter.frame_count == 1, counter.frame_count
    targets = {str(node.target) for node in counter.graphs[0].graph.nodes if node.op == "call_function"}
    assert "megacpm.rotary.default" in targets, targets
    x64 = x.detach().double().requires_grad_(True)
    out64 = rotary_torch(x64, cos.double()[ids], sin.double()[ids])
    (dx64,) = torch.autograd.grad(out64, (x64,), probe.double())
    assert_close_to_reference(out, out64, atol=1e-6, name="compiled output")
    assert_close_to_reference(dx, dx64, atol=1e-6, name="compiled dx")


def test_dweight_only_when_weight_needs_grad(monkeypatch):
    torch._dynamo.reset()
    calls = []
    real = rms_norm_module.rms_norm_backward

    def recording(*args, need_dweight=True, **kwargs):
        calls.append(need_dweight)
        return real(*args, need_dweight=need_dweight, **kwargs)

    monkeypatch.setattr(rms_norm_module, "rms_norm_backward", recording)
    x, weight, dy = randn(4, HIDDEN, seed=20, scale=3), 1 + 0.5 * randn(HIDDEN, seed=21), randn(4, HIDDEN, seed=22)

    def norm(x, weight):
        return rms_norm(x, weight, EPS, impl="triton")

    compiled = torch.compile(norm, fullgraph=True, backend="aot_eager")
    for fn in (norm, compiled):
        calls.clear()
        xg = x.clone().requires_grad_(True)
        (dx,) = torch.autograd.grad(fn(xg, weight), (xg,), dy)
        wg = weight.clone().requires_grad_(True)
        (dw,) = torch.autograd.grad(fn(x, wg), (wg,), dy)
        assert calls == [False, True], calls
        x64, w64 = x.double().requires_grad_(True), weight.double().requires_grad_(True)
        dx64, dw64 = torch.autograd.grad(rms_norm_torch(x64, w64, EPS), (x64, w64), dy.double())
        assert_close_to_reference(dx, dx64, atol=1e-5, name="dx")
        assert_close_to_reference(dw, dw64, atol=1e-5, name="dweight")


# --------------------------------------------------------------------------------------------------
# Without triton
# --------------------------------------------------------------------------------------------------
def test_ops_register_without_triton():
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        sys.modules["triton.language"] = None
        import pytest
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        import megacpm.kernels as kernels
        from megacpm.kernels.dispatch import triton
        from megacpm.kernels.rms_norm import rms_norm_torch
        assert triton is None
        x, w = torch.randn(3, 8), torch.ones(8)
        cos, sin = torch.ones(2, 2), torch.zeros(2, 2)
        q = torch.randn(1, 2, 1, 4)
        cos3, sin3 = cos[None], sin[None]  # per-row tables [batch, seq, D / 2]
        assert torch.equal(kernels.rms_norm(x, w, 1e-5), rms_norm_torch(x, w, 1e-5))  # "auto": torch
        assert torch.equal(kernels.rotary(q, cos, sin), q)
        assert torch.equal(kernels.rotary(q, cos3, sin3), q)
        with FakeTensorMode() as mode:
            y, rstd = torch.ops.megacpm.rms_norm_forward(mode.from_tensor(x), mode.from_tensor(w), 1e-5)
            assert y.shape == (3, 8) and rstd.shape == (3,) and rstd.dtype == torch.float32
            r = torch.ops.megacpm.rotary(mode.from_tensor(q), mode.from_tensor(cos), mode.from_tensor(sin), 0, False)
            assert r.shape == q.shape
            r = torch.ops.megacpm.rotary(mode.from_tensor(q), mode.from_tensor(cos3), mode.from_tensor(sin3), 0,
                                         False)
            assert r.shape == q.shape
        with pytest.raises(RuntimeError, match="triton"):
            torch.ops.megacpm.rms_norm_forward(x, w, 1e-5)
        with pytest.raises(RuntimeError, match="triton"):
            torch.ops.megacpm.rotary(q, cos, sin, 0, False)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
