"""Communication accounting against Megatron's analytic figures.

Per decoder layer under TP without SP: forward 2 all-reduces of batch*seq*hidden (after the attention
output and after the MLP down projection), backward 2 more (the inputs of the column-parallel q/k/v
and gate/up). With SP: 2 all-gathers and 2 reduce-scatters of the same (full) size each way. The
per-layer figure is the difference between a 4-layer and a 2-layer model, which cancels the
embedding and the loss. DP and PP volumes follow from the parameter count and the schedule.
"""
import pytest
import torch

from megacpm.parallel.comm_stats import CommAccounting
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.sharded_model import ShardedModel
from megacpm.train.train_module import TrainModule
from tests.distributed import run_distributed
from tests.tiny_run import GLOBAL_BATCH, LR, MICRO_BATCH, SEQ, global_batches, make_config

pytestmark = pytest.mark.slow
HIDDEN = make_config().model.hidden_size
ACTIVATION_BYTES = MICRO_BATCH * SEQ * HIDDEN * 4  # one micro-batch's hidden states, fp32


def _layer_traffic(layers, sp, backward):
    cfg = make_config(tp=2, sp=sp)
    cfg.model.num_hidden_layers = layers
    ctx = ParallelContext.initialize(tp=2)
    stage = ShardedModel(cfg.model, ctx, sequence_parallel=sp, generator=torch.Generator().manual_seed(0)).last_chunk
    tokens = global_batches(1)[0].rows(0, MICRO_BATCH)
    with CommAccounting(ctx) as comm:
        loss = stage.head_loss(stage.hidden(tokens.input_ids), tokens.labels)
        if backward:
            loss.backward()
    return comm.summary()


def _difference(sp, backward):
    four = run_distributed(_layer_traffic, 2, args=(4, sp, backward))[0]
    two = run_distributed(_layer_traffic, 2, args=(2, sp, backward))[0]
    keys = set(four) | set(two)
    zero = {"calls": 0, "bytes": 0}
    return {k: {m: four.get(k, zero)[m] - two.get(k, zero)[m] for m in ("calls", "bytes")} for k in keys}


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward-backward"])
def test_tp_all_reduces_per_layer_match_megatron(backward):
    per_two_layers = _difference(sp=False, backward=backward)
    expected_calls = 2 * 2 * (2 if backward else 1)  # 2 layers x 2 all-reduces (x2 with the backward)
    assert per_two_layers["tp.all_reduce"] == {"calls": expected_calls, "bytes": expected_calls * ACTIVATION_BYTES}
    assert all(v == {"calls": 0, "bytes": 0} for k, v in per_two_layers.items() if k != "tp.all_reduce")


def test_sequence_parallel_replaces_all_reduces_by_gather_and_scatter():
    per_two_layers = _difference(sp=True, backward=True)
    # Each layer: 2 all-gathers + 2 reduce-scatters forward, the conjugates backward. gloo has no
    # reduce-scatter: megacpm issues a full-size all-reduce there (NCCL gets the real one).
    assert per_two_layers["tp.all_gather"] == {"calls": 8, "bytes": 8 * ACTIVATION_BYTES}
    assert per_two_layers["tp.all_reduce"] == {"calls": 8, "bytes": 8 * ACTIVATION_BYTES}
    assert set(per_two_layers) == {"tp.all_gather", "tp.all_reduce"}


def _step_traffic(parallel):
    cfg = make_config(**parallel)
    ctx = ParallelContext.initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    step = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0))
    with CommAccounting(ctx) as comm:
        step.step(global_batches(1)[0], LR)
    return comm.summary(), step.optimizer.buffers["dp_cp"].buffer.numel() * 4


def test_data_parallel_reduces_the_gradient_buffer_once_per_step():
    for summary, buffer_bytes in run_distributed(_step_traffic, 2, args=(dict(),)):
        assert summary["dp.all_reduce"] == {"calls": 1, "bytes": buffer_bytes}  # one 40 MB bucket holds all


def test_pipeline_sends_one_activation_per_micro_batch_each_way():
    micro_batches = GLOBAL_BATCH // MICRO_BATCH
    for summary, _ in run_distributed(_step_traffic, 2, args=(dict(pp=2),)):
        # Stage 0 sends activations forward, stage 1 sends their gradients back.
        assert summary["pp.send"] == {"calls": micro_batches, "bytes": micro_batches * ACTIVATION_BYTES}
