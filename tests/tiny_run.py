"""A tiny MiniCPM and its fixed global batches, shared by the parallel and checkpoint tests, with the
independent reference: the plain single-process MiniCPM, AdamW with muP groups and global-norm
clipping (none of megacpm's parallel code)."""
from typing import Optional

import torch

from megacpm.config import Config
from megacpm.data.batch import Batch
from megacpm.model import MiniCPM
from megacpm.optim import build_optimizer, clip_grad_norm_, set_lr

GLOBAL_BATCH, MICRO_BATCH, SEQ, VOCAB, LR = 8, 2, 8, 64, 0.1


def make_config(vocab_size: int = VOCAB, seq_len: int = SEQ, **parallel) -> Config:
    cfg = Config()
    m = cfg.model
    m.hidden_size, m.intermediate_size, m.num_hidden_layers = 32, 48, 4
    m.num_attention_heads, m.num_key_value_heads, m.vocab_size, m.dim_model_base = 4, 2, vocab_size, 8
    cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.seq_len = GLOBAL_BATCH, MICRO_BATCH, seq_len
    cfg.optim.clip_grad = 0.5  # low enough to clip: the norm must be global for the losses to agree
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def global_batches(steps: int, vocab_size: int = VOCAB, document_eod: Optional[int] = None, seq_len: int = SEQ):
    """Fixed random batches; with ``document_eod`` each row's documents end at that token, placed
    also at a third and two thirds of each row (data.document_mask: positions restart, attention
    stays inside each document)."""
    g = torch.Generator().manual_seed(7)
    windows = [torch.randint(0, vocab_size, (GLOBAL_BATCH, seq_len + 1), generator=g) for _ in range(steps)]
    if document_eod is None:
        return [Batch.from_tokens(w) for w in windows]
    for w in windows:
        w[:, [seq_len // 3, 2 * seq_len // 3]] = document_eod
    return [Batch.from_tokens(w).with_document_mask(document_eod) for w in windows]


def reference_run(steps: int, lr: float = LR, vocab_size: int = VOCAB, document_eod: Optional[int] = None,
                  seq_len: int = SEQ):
    """(losses, grad norms) of ``steps`` steps in one process (positions and document mask from the
    batches when they carry them)."""
    cfg = make_config(vocab_size)
    model = MiniCPM(cfg.model)
    model.init_weights(torch.Generator().manual_seed(0))
    optimizer = build_optimizer(model, cfg.model, cfg.optim)
    losses, norms = [], []
    for batch in global_batches(steps, vocab_size, document_eod, seq_len):
        total = 0.0
        for micro in batch.split_rows(MICRO_BATCH):
            loss_sum = model.head_loss(model.hidden(micro.input_ids, micro.position_ids, micro.document_ids),
                                       micro.labels)
            (loss_sum / batch.labels.numel()).backward()
            total += float(loss_sum.detach())
        norms.append(float(clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)))
        set_lr(optimizer, lr)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total / batch.labels.numel())
    return losses, norms


MOE = dict(num_experts=4, num_experts_per_tok=2, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01,
           moe_router_bias_update_rate=0.01)


def make_moe_config(**parallel) -> Config:
    """make_config's model with every MLP 4 experts, top-2, every balancing term switched on (the
    coefficients large enough that a mis-scaled auxiliary gradient shows in the losses)."""
    cfg = make_config(**parallel)
    for key, value in MOE.items():
        setattr(cfg.model, key, value)
    return cfg
