"""optim.mup_lr_scaling: false trains every group at optim.lr; the forward multipliers stay."""
from megacpm.config import Config
from megacpm.model import MiniCPM
from megacpm.optim import build_optimizer


def _lrs(scaling: bool):
    cfg = Config()
    cfg.model.hidden_size, cfg.model.dim_model_base = 512, 128  # m = 4
    cfg.optim.mup_lr_scaling = scaling
    model = MiniCPM(cfg.model)
    optimizer = build_optimizer(model, cfg.model, cfg.optim)
    return {g["name"]: g["lr"] for g in optimizer.param_groups}, model


def test_matrix_group_lr_follows_mup_lr_scaling():
    scaled, _ = _lrs(True)
    plain, model = _lrs(False)
    assert scaled["matrix"] == 0.01 / 4 and scaled["vector"] == 0.01
    assert set(plain.values()) == {0.01}
    assert model.cfg.width_mult == 4 and model.cfg.embedding_scale == 12.0  # the architecture is unchanged
