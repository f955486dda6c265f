"""Context parallelism's acceptance: every cp layout gives the single-process losses and gradient
norms at every step (within 1e-4), through the whole engine (TrainModule: the head-tail split of
the batch, the cp attention cores, RoPE at global positions, gradients reduced over dp x cp, the
loss as the global sum over the global token count).

The reference is tests.tiny_run's plain single-process MiniCPM and AdamW on the same batches. The
layouts of one world size share one spawned group (ParallelContext.initialize once per layout)."""
import pytest
import torch

from megacpm.parallel.context import ParallelContext
from megacpm.train.train_module import TrainModule
from tests.distributed import run_distributed
from tests.tiny_run import LR, global_batches, make_config, reference_run

pytestmark = pytest.mark.slow
STEPS, SEQ, EOD = 5, 16, 0

# (name, parallel settings, document mask) per world size
LAYOUTS = {
    2: [("cp2", dict(cp=2), False),
        ("cp2-ring", dict(cp=2, cp_attention="ring"), False),
        ("cp2-document-mask", dict(cp=2), True),
        ("cp2-ring-document-mask", dict(cp=2, cp_attention="ring"), True)],
    4: [("cp4", dict(cp=4), False),
        ("cp4-ring", dict(cp=4, cp_attention="ring"), False),
        ("cp2-tp2-sp", dict(cp=2, tp=2, sp=True), False),
        ("cp2-pp2", dict(cp=2, pp=2), False),
        ("cp2-pp2-vpp2", dict(cp=2, pp=2, vpp=2), False),
        ("cp2-dp2-zero1", dict(cp=2, zero1=True), False)],
}


def _losses(layouts):
    results = {}
    for name, parallel, masked in layouts:
        cfg = make_config(seq_len=SEQ, **parallel)
        p = cfg.parallel
        ctx = ParallelContext.initialize(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, timeout_s=120)
        module = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0))
        steps = [module.step(batch, LR) for batch in global_batches(STEPS, document_eod=EOD if masked else None,
                                                                    seq_len=SEQ)]
        results[name] = ([s["loss"] for s in steps], [s["grad_norm"] for s in steps])
    return results


@pytest.fixture(scope="module")
def references():
    return {masked: reference_run(STEPS, document_eod=EOD if masked else None, seq_len=SEQ)
            for masked in (False, True)}


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_cp_layouts_match_one_process(references, world):
    layouts = LAYOUTS[world]
    per_rank = run_distributed(_losses, world, args=(layouts,), timeout=500)
    for name, _, masked in layouts:
        losses, norms = references[masked]
        for rank_results in per_rank:
            got_losses, got_norms = rank_results[name]
            assert got_losses == pytest.approx(losses, rel=1e-4), name
            assert got_norms == pytest.approx(norms, rel=1e-4), name


def test_the_document_mask_changes_the_reference():
    # Otherwise the masked layouts would pass without a mask: the same tokens without it.
    batches = global_batches(STEPS, document_eod=EOD, seq_len=SEQ)
    assert all(len(set(b.document_ids[0].tolist())) >= 3 for b in batches)
    cfg = make_config(seq_len=SEQ)
    plain, masked = [], []
    for keep_mask, losses in ((False, plain), (True, masked)):
        ctx = ParallelContext.single()
        module = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0))
        for b in batches:
            b = b if keep_mask else type(b)(input_ids=b.input_ids, labels=b.labels)
            losses.append(module.step(b, LR)["loss"])
    assert max(abs(a - b) / a for a, b in zip(plain, masked)) > 20 * 1e-4
