"""train.compile in one process: compiled blocks compute what the eager ones do, compile once per
phase, keep the parameter names, and survive activation checkpointing and the comm accounting.

The reference is the plain single-process MiniCPM with AdamW (tests.tiny_run.reference_run), none
of the compiled code; losses must agree within 1e-5 (fp32, CPU)."""
import pytest
import torch

from megacpm.model.compile import EVAL, TRAIN
from megacpm.parallel.comm_stats import CommAccounting
from megacpm.parallel.context import ParallelContext
from megacpm.train.train_module import TrainModule
from tests.tiny_run import LR, global_batches, make_config, reference_run

STEPS = 3


def _module(compile, activation_checkpointing=False):
    cfg = make_config()
    cfg.train.compile, cfg.train.activation_checkpointing = compile, activation_checkpointing
    return TrainModule(cfg, ParallelContext.single(torch.device("cpu")), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference():
    return reference_run(STEPS)


@pytest.mark.parametrize("activation_checkpointing", [False, True], ids=["eager-memory", "checkpointed"])
def test_compiled_steps_match_the_reference_and_compile_once(reference, activation_checkpointing):
    losses, norms = reference
    module = _module(True, activation_checkpointing)
    stats = module.model.compile_stats
    assert stats.graphs == {TRAIN: 0, EVAL: 0}
    results = []
    for i, batch in enumerate(global_batches(STEPS)):
        if i == 1:  # a logged step of a parallel run: the accounting mode must not switch compile off
            with CommAccounting(module.ctx):
                results.append(module.step(batch, LR))
        else:
            results.append(module.step(batch, LR))
    assert [r["loss"] for r in results] == pytest.approx(losses, rel=1e-5, abs=1e-5)
    assert [r["grad_norm"] for r in results] == pytest.approx(norms, rel=1e-5)
    # Every layer shares one training graph (parameters are inputs), compiled on the first step;
    # the later steps, the accounted one included, ran it without compiling again.
    assert stats.graphs == {TRAIN: 1, EVAL: 0}
    eval_batch = global_batches(1)[0]
    compiled_eval = module.evaluate(eval_batch)["loss"]
    module.evaluate(eval_batch)
    assert stats.graphs == {TRAIN: 1, EVAL: 1}
    assert stats.seconds[TRAIN] > 0 and stats.seconds[EVAL] > 0
    eager = _module(False)
    for batch in global_batches(STEPS):
        eager.step(batch, LR)
    assert compiled_eval == pytest.approx(eager.evaluate(eval_batch)["loss"], rel=1e-5)


def test_the_compiled_model_keeps_the_eager_names_and_specs():
    compiled, eager = _module(True), _module(False)
    assert compiled.model.compile_stats is not None and eager.model.compile_stats is None
    compiled_params, eager_params = compiled.model.params_by_name(), eager.model.params_by_name()
    assert list(compiled_params) == list(eager_params)
    for name, param in compiled_params.items():
        assert torch.equal(param, eager_params[name]), name
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())


def test_an_moe_model_compiles_its_attention_and_norms_and_matches_eager():
    """An MoE block compiles its norms and attention (the mixture stays eager): the steps equal the
    eager module's, the routing metrics too, and later steps run the same graphs."""
    from tests.tiny_run import make_moe_config

    results = {}
    for compiled in (True, False):
        cfg = make_moe_config()
        cfg.train.compile = compiled
        module = TrainModule(cfg, ParallelContext.single(torch.device("cpu")), generator=torch.Generator().manual_seed(0))
        results[compiled] = [module.step(batch, LR) for batch in global_batches(STEPS)]
        if compiled:
            graphs = dict(module.model.compile_stats.graphs)
    for compiled, eager in zip(results[True], results[False]):
        for key in ("loss", "grad_norm", "moe/aux_loss", "moe/max_load"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-6), key
    # One graph for the RMSNorms, one for the attention, both from the first step.
    assert graphs == {TRAIN: 2, EVAL: 0}
