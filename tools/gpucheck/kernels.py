"""Every Triton kernel of megacpm.kernels with impl="triton", forward and backward, fp32 and bf16, against
fp64 references (plain torch, written out here) computed on the same device from upcast copies of the
same inputs.

One row per (kernel, shape, dtype, pass): ``||out - ref|| / ||ref||`` for the output and for the
gradient of every differentiable input (weights included), bounded by REL_ERROR_BOUNDS ("float32" for
the elementwise / row kernels, "tf32" for the fused linear cross entropy in fp32, "bfloat16" for bf16).
Each check draws fresh random inputs (its own seeded generator on the device) and the CUDA caching
allocator is filled with NaN before every kernel run, so an output element a kernel never writes fails.
Any exception inside one case is a failing row with the exception text; the other cases still run.

Shapes on a GPU: MiniCPM-1.2B (hidden 1536, 24 heads, 8 kv heads, head_dim 64, vocab 73440) and 2.4B
(hidden 2304, 36 heads, 36 kv heads, vocab 122753), 2 x 4096 tokens for RMSNorm and rotary (rotary on
q and on k as non-contiguous views of a fused qkv projection), 2048 tokens for the [tokens, vocab]
logits of the cross entropies, 4096 for the fused linear ones (several token chunks). The
vocab-parallel kernels run on one rank of a one-process group (gloo on the CPU, NCCL on CUDA); the
fused one with a padded shard (valid_rows < rows). Context parallelism's ring core runs there too,
on a ring of one (its block kernel and log-sum-exp merge; the exchange is tested over gloo in
tests/parallel). The CPU rehearsal runs the same cases at tiny odd
sizes under the Triton interpreter.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from megacpm.parallel.local_launch import free_port
from gpucheck.common import REL_ERROR_BOUNDS, Env, Row, check, poison_allocator, rel_error

IGNORE = -100
RMS_EPS = 1e-5


@dataclass
class Case:
    kernel: str
    shape: str  # a label: model and sizes
    make: Callable  # (generator, dtype) -> (inputs, grad_names): grad_names[i] names input i's gradient or None
    fn: Callable  # (inputs) -> output, with impl="triton"
    ref: Callable  # (fp64 inputs) -> output, plain torch
    fp32_bound: str = "float32"


# -- inputs ------------------------------------------------------------------------------------------
def _randn(g, shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=g, device=g.device) * scale + shift).to(dtype)


def _labels(g, n, vocab):
    y = torch.randint(0, vocab, (n,), generator=g, device=g.device)
    y[torch.rand(n, generator=g, device=g.device) < 0.15] = IGNORE
    y[0], y[1], y[2] = 0, vocab - 1, IGNORE  # both ends of the vocabulary and one ignored for sure
    return y


def _rope_tables(seq, head_dim, device):
    inv = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angle = torch.arange(seq, dtype=torch.float64, device=device)[:, None] * inv[None]
    return angle.cos().float(), angle.sin().float()  # fp32 [seq, head_dim // 2], as the model keeps them


# -- the fp64 references -------------------------------------------------------------------------------
def ref_rms_norm(x, w):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)


def ref_rotary(x, cos, sin):
    half, seq = x.shape[-1] // 2, x.shape[1]
    c, s = cos[:seq][None, :, None, :], sin[:seq][None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


def ref_cross_entropy(logits, labels, scale, reduction):
    x = logits * scale
    lse = torch.logsumexp(x, -1)
    valid = labels != IGNORE
    target = x.gather(-1, torch.where(valid, labels, 0)[:, None])[:, 0]
    loss = torch.where(valid, lse - target, torch.zeros_like(lse))
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum().clamp(min=1)


# -- the cases -----------------------------------------------------------------------------------------
def rms_case(label, shape):
    def make(g, dt):
        return [_randn(g, shape, dt), _randn(g, shape[-1:], dt, 0.3, 1.0)], ["dx", "dweight"]
    from megacpm.kernels import rms_norm
    return Case("rms_norm", f"{label} x{list(shape)}", make,
                lambda i: rms_norm(i[0], i[1], RMS_EPS, impl="triton"), lambda i: ref_rms_norm(i[0], i[1]))


def rotary_case(label, batch, seq, heads, kv, head_dim, which):
    """q ([:, :, :heads]) or k ([:, :, heads:heads + kv]) as a strided view of a fused qkv activation."""
    lo, hi = (0, heads) if which == "q" else (heads, heads + kv)
    width = heads + 2 * kv

    def view(qkv):
        return qkv.view(batch, seq, width, head_dim)[:, :, lo:hi]

    def make(g, dt):
        cos, sin = _rope_tables(seq, head_dim, g.device)
        return [_randn(g, (batch, seq, width * head_dim), dt), cos, sin], ["dqkv", None, None]

    from megacpm.kernels import rotary
    return Case("rotary", f"{label} {which} view [{batch}, {seq}, {hi - lo}/{width}, {head_dim}]", make,
                lambda i: rotary(view(i[0]), i[1], i[2], impl="triton"),
                lambda i: ref_rotary(view(i[0]), i[1], i[2]))


def ce_case(label, tokens, vocab, scale, reduction="mean"):
    def make(g, dt):
        return [_randn(g, (tokens, vocab), dt, 4.0), _labels(g, tokens, vocab)], ["dlogits", None]
    from megacpm.kernels import cross_entropy
    return Case("cross_entropy", f"{label} [{tokens}, {vocab}] scale {scale:.3g} {reduction}", make,
                lambda i: cross_entropy(i[0], i[1], scale, IGNORE, reduction, impl="triton"),
                lambda i: ref_cross_entropy(i[0], i[1], scale, reduction))


def vp_ce_case(label, tokens, vocab, scale, reduction="none"):
    def make(g, dt):
        return [_randn(g, (tokens, vocab), dt, 4.0), _labels(g, tokens, vocab)], ["dlogits", None]
    from megacpm.kernels import vocab_parallel_cross_entropy
    return Case("vocab_parallel_cross_entropy", f"{label} 1 rank [{tokens}, {vocab}] {reduction}", make,
                lambda i: vocab_parallel_cross_entropy(i[0], i[1], dist.group.WORLD, scale, IGNORE, reduction,
                                                       impl="triton"),
                lambda i: ref_cross_entropy(i[0], i[1], scale, reduction))


def flce_case(label, tokens, hidden, vocab, scale, chunk=None, pad=0, reduction="mean"):
    """The fused linear CE; with pad > 0 the vocab-parallel one on one rank, weight rows vocab + pad."""
    rows = vocab + pad

    def make(g, dt):
        return ([_randn(g, (tokens, hidden), dt), _randn(g, (rows, hidden), dt, 3.0 / math.sqrt(hidden)),
                 _labels(g, tokens, vocab)], ["dhidden", "dweight", None])

    def ref(i):  # padding rows take no part: their gradient is zero
        return ref_cross_entropy(i[0] @ i[1][:vocab].T, i[2], scale, reduction)

    from megacpm.kernels import fused_linear_cross_entropy, fused_linear_vocab_parallel_cross_entropy
    chunk_label = f", chunk {chunk}" if chunk else ""
    if pad:
        return Case("fused_linear_vocab_parallel_cross_entropy",
                    f"{label} 1 rank [{tokens}, {hidden}] x [{rows} ({vocab} valid), {hidden}]{chunk_label} "
                    f"{reduction}", make,
                    lambda i: fused_linear_vocab_parallel_cross_entropy(
                        i[0], i[1], i[2], dist.group.WORLD, scale, IGNORE, reduction, valid_rows=vocab,
                        chunk_tokens=chunk, impl="triton"), ref, "tf32")
    return Case("fused_linear_cross_entropy", f"{label} [{tokens}, {hidden}] x [{vocab}, {hidden}]{chunk_label} "
                f"{reduction}", make,
                lambda i: fused_linear_cross_entropy(i[0], i[1], i[2], scale, IGNORE, reduction, impl="triton",
                                                     chunk_tokens=chunk), ref, "tf32")


def ref_causal_attention(q, k, v):
    """Causal attention of [b, n, h, d] queries over [b, n, kv_heads, d] keys and values, written out."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.repeat_interleave(groups, 2).transpose(1, 2), v.repeat_interleave(groups, 2).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    n = q.shape[2]
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)


def ring_case(label, batch, seq, heads, kv, head_dim):
    """Context parallelism's ring core on a ring of one rank: its block kernel (the fused chunk pairs
    where PyTorch has a fused attention for the dtype: CUDA bf16, any CPU float) and the log-sum-exp
    merge, forward and backward, without the peer-to-peer exchange."""
    def make(g, dt):
        return ([_randn(g, (batch, seq, heads, head_dim), dt), _randn(g, (batch, seq, kv, head_dim), dt),
                 _randn(g, (batch, seq, kv, head_dim), dt)], ["dq", "dk", "dv"])
    from megacpm.parallel.context_parallel import RingAttention
    return Case("ring_attention", f"{label} 1 rank [{batch}, {seq}, {heads} ({kv} kv), {head_dim}]", make,
                lambda i: RingAttention(dist.group.WORLD)(i[0], i[1], i[2]), lambda i: ref_causal_attention(*i),
                "tf32")  # fp32 on CUDA is the masked kernel, whose matmuls may run in TF32


def cases(env: Env) -> List[Case]:
    if env.cuda:
        # (label, hidden, heads, kv heads, vocab); head_dim 64; logit scale 1 / (hidden / 256)
        models = [("1.2B", 1536, 24, 8, 73440), ("2.4B", 2304, 36, 36, 122753)]
        out = []
        for label, hidden, heads, kv, vocab in models:
            scale = 256.0 / hidden
            out += [rms_case(label, (2, 4096, hidden)),
                    rotary_case(label, 2, 4096, heads, kv, 64, "q"), rotary_case(label, 2, 4096, heads, kv, 64, "k"),
                    ce_case(label, 2048, vocab, scale),
                    flce_case(label, 4096, hidden, vocab, scale)]
        out += [ring_case("1.2B", 1, 4096, 24, 8, 64),
                vp_ce_case("2.4B", 2048, 122753, 256.0 / 2304),
                flce_case("2.4B", 4096, 2304, 122753, 256.0 / 2304, pad=127, reduction="sum")]
        return out
    # the rehearsal: tiny odd sizes (the interpreter pays ~1 ms per program instance)
    scale = 1 / 6
    return [rms_case("tiny", (2, 13, 48)), rms_case("tiny", (37, 40)),
            rotary_case("tiny GQA", 2, 7, 4, 2, 16, "q"), rotary_case("tiny GQA", 2, 7, 4, 2, 16, "k"),
            ce_case("tiny", 29, 301, scale),
            vp_ce_case("tiny", 29, 257, scale),
            ring_case("tiny GQA", 2, 12, 4, 2, 8),
            flce_case("tiny", 29, 48, 211, scale, chunk=8),
            flce_case("tiny", 29, 48, 211, scale, chunk=8, pad=13, reduction="sum")]


# -- the generic check -----------------------------------------------------------------------------------
def _grad_out(g, out: torch.Tensor) -> torch.Tensor:
    if out.numel() == 1:
        return (0.5 + torch.rand((), generator=g, device=g.device)).to(out.dtype).reshape(out.shape)
    return _randn(g, out.shape, out.dtype)


def _leaves(inputs: Sequence[torch.Tensor], names, dtype: Optional[torch.dtype]):
    """Detached copies (fp64 when dtype is None) with requires_grad where a gradient is checked."""
    out = []
    for t, name in zip(inputs, names):
        t = t.detach().clone() if (dtype is not None or not t.is_floating_point()) else t.detach().double()
        out.append(t.requires_grad_(True) if name else t)
    return out


def run_case(case: Case, dtype: torch.dtype, seed: int, env: Env) -> List[Row]:
    tag = f"{case.kernel} {case.shape} {str(dtype).replace('torch.', '')}"
    bound = REL_ERROR_BOUNDS["bfloat16" if dtype == torch.bfloat16 else case.fp32_bound]
    start = time.monotonic()
    try:
        g = torch.Generator(device=env.device).manual_seed(seed)
        inputs, names = case.make(g, dtype)
        tri_in, ref_in = _leaves(inputs, names, dtype), _leaves(inputs, names, None)
        del inputs
        wrt = [i for i, n in enumerate(names) if n]
        poison_allocator(env.device)
        out = case.fn(tri_in)
        grad_out = _grad_out(g, out)
        poison_allocator(env.device)
        grads = torch.autograd.grad(out, [tri_in[i] for i in wrt], grad_out)
        if env.cuda:
            torch.cuda.synchronize()
        kernel_s = time.monotonic() - start
        ref_out = case.ref(ref_in)
        ref_grads = torch.autograd.grad(ref_out, [ref_in[i] for i in wrt], grad_out.double())
        detail = f"out {str(out.dtype).replace('torch.', '')}, kernel fwd+bwd {kernel_s:.2f} s"
        rows = [check(f"{tag} fwd", rel_error(out, ref_out), bound, "rel err", detail)]
        rows += [check(f"{tag} bwd {names[i]}", rel_error(gr, rg), bound, "rel err",
                       f"{str(gr.dtype).replace('torch.', '')} {list(gr.shape)}")
                 for i, gr, rg in zip(wrt, grads, ref_grads)]
    except Exception as exc:  # one broken kernel must not hide the others
        rows = [Row(f"{tag}", False, None, "", "runs", f"{type(exc).__name__}: {str(exc)[:800]}")]
    env.log(f"{tag}: {'ok' if all(r.ok for r in rows) else 'FAIL'} in {time.monotonic() - start:.2f} s "
            + ", ".join(f"{r.value:.2e}" if r.value is not None else r.detail for r in rows))
    return rows


# -- the one-process group -------------------------------------------------------------------------------
def _init_group(env: Env) -> bool:
    if dist.is_initialized():
        return False
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    if env.cuda:
        torch.cuda.set_device(env.device)
    dist.init_process_group("nccl" if env.cuda else "gloo", rank=0, world_size=1)
    return True


def run(env: Env) -> List[Row]:
    rows: List[Row] = []
    created = False
    try:
        created = _init_group(env)
    except Exception as exc:
        rows.append(Row("one-process group for the vocab-parallel kernels", False, None, "", "initialised",
                        f"{type(exc).__name__}: {exc}"))
    try:
        seed = 1000
        for case in cases(env):
            if ("vocab_parallel" in case.kernel or case.kernel == "ring_attention") and not dist.is_initialized():
                continue  # the failing row above stands for it
            for dtype in (torch.float32, torch.bfloat16):
                seed += 1
                rows += run_case(case, dtype, seed, env)
                if env.cuda:
                    torch.cuda.empty_cache()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
    return rows
