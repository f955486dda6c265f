"""The two power laws of the MiniCPM paper, their fits and what follows from them.

Data-model law (paper, section 4.3), N non-embedding parameters and D tokens, both in billions:

    L(N, D) = C_N * N**-alpha + C_D * D**-beta + L0

With training compute C = 6 N D FLOPs, minimising L along N D = C/6 gives

    N_opt / D_opt = K**2 * (C/6)**eta,   K = (alpha C_N / (beta C_D))**(1/(alpha+beta)),
    eta = (beta - alpha) / (alpha + beta)

(C/6 in units of 1e18, because N and D are in billions). The paper's average fit,
0.0715 N^-0.29 + 0.300 D^-0.23 + 0.31, puts the compute-optimal data at about 192 tokens per
parameter where Chinchilla's puts it at about 20.

Batch-size law (section 4.2): the batch size (tokens) that reaches a loss L in the fewest tokens is
bs = a / L**b; the paper's fit on C4 is 1.21e9 / L**6.24.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Sequence, Tuple

import numpy as np

UNIT = 1e9  # N and D are counted in billions
FLOPS_PER_PARAM_TOKEN = 6.0  # forward + backward, the C = 6ND convention


class FitError(ValueError):
    """The points cannot determine the law (too few, non-positive, or not varied enough)."""


@dataclass(frozen=True)
class DataModelLaw:
    C_N: float
    alpha: float
    C_D: float
    beta: float
    L0: float

    def loss(self, N, D):
        """Predicted loss at N non-embedding parameters and D tokens (billions; arrays broadcast)."""
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.C_N * N ** -self.alpha + self.C_D * D ** -self.beta + self.L0

    @property
    def K(self) -> float:
        return (self.alpha * self.C_N / (self.beta * self.C_D)) ** (1.0 / (self.alpha + self.beta))

    @property
    def eta(self) -> float:
        return (self.beta - self.alpha) / (self.alpha + self.beta)

    def optimal_split(self, flops: float) -> Tuple[float, float]:
        """(N_opt, D_opt) in billions for a training budget of ``flops`` FLOPs (C = 6 N D)."""
        nd = flops / FLOPS_PER_PARAM_TOKEN / UNIT ** 2  # N * D, both in billions
        n_opt = self.K * nd ** (self.beta / (self.alpha + self.beta))
        return n_opt, nd / n_opt

    def tokens_per_parameter(self, flops: float) -> float:
        """D_opt / N_opt = K**-2 (C/6)**-eta at the budget."""
        n_opt, d_opt = self.optimal_split(flops)
        return d_opt / n_opt

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


PAPER_DATA_MODEL_LAW = DataModelLaw(C_N=0.0715, alpha=0.29, C_D=0.300, beta=0.23, L0=0.31)


@dataclass(frozen=True)
class DataModelFit:
    law: DataModelLaw
    rmse: float  # root mean square residual of the loss
    points: int
    starts: int  # optimisation starts tried; the best one is kept


def _as_points(N: Sequence[float], D: Sequence[float], loss: Sequence[float]):
    N, D, loss = (np.asarray(v, dtype=float).ravel() for v in (N, D, loss))
    if not (len(N) == len(D) == len(loss)):
        raise FitError(f"N, D and loss have different lengths ({len(N)}, {len(D)}, {len(loss)})")
    if not np.all(np.isfinite(N) & np.isfinite(D) & np.isfinite(loss)):
        raise FitError("N, D and loss must all be finite numbers")
    if np.any(N <= 0) or np.any(D <= 0):
        raise FitError("N and D must be positive")
    return N, D, loss


def fit_data_model_law(N: Sequence[float], D: Sequence[float], loss: Sequence[float], starts: int = 64,
                       seed: int = 0) -> DataModelFit:
    """Bounded least squares of L(N, D) on the points, best of ``starts`` random starts.

    The coefficients are optimised as logarithms (they span orders of magnitude), the exponents in
    [0.01, 3] and L0 in [0, min(loss)] (an irreducible loss above an observed loss is impossible).
    Several starts because the surface has flat valleys (a larger C_N with a smaller alpha fits a
    narrow range of N almost as well); each start is a local trust-region solve.
    """
    from scipy.optimize import least_squares  # local: scipy is needed only to fit, and slow to import

    N, D, loss = _as_points(N, D, loss)
    if len(loss) < 5:
        raise FitError(f"5 parameters need at least 5 points, got {len(loss)}")
    if len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
        raise FitError("the points need at least two model sizes N and two data sizes D")
    log_n, log_d = np.log(N), np.log(D)

    def residuals(p: np.ndarray) -> np.ndarray:
        log_cn, alpha, log_cd, beta, l0 = p
        return np.exp(log_cn - alpha * log_n) + np.exp(log_cd - beta * log_d) + l0 - loss

    floor = float(loss.min())
    lower = np.array([-20.0, 0.01, -20.0, 0.01, 0.0])
    upper = np.array([10.0, 3.0, 10.0, 3.0, floor])
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(starts):
        start = np.array([rng.uniform(-6, 3), rng.uniform(0.05, 1.0), rng.uniform(-6, 3), rng.uniform(0.05, 1.0),
                          rng.uniform(0.0, floor)])
        result = least_squares(residuals, start, bounds=(lower, upper), method="trf", x_scale="jac",
                               max_nfev=2000)
        if best is None or result.cost < best.cost:
            best = result
    log_cn, alpha, log_cd, beta, l0 = best.x
    law = DataModelLaw(C_N=math.exp(log_cn), alpha=float(alpha), C_D=math.exp(log_cd), beta=float(beta),
                       L0=float(l0))
    rmse = math.sqrt(2.0 * best.cost / len(loss))
    return DataModelFit(law=law, rmse=rmse, points=len(loss), starts=starts)


@dataclass(frozen=True)
class BatchSizeLaw:
    """bs = a / L**b: the batch size in tokens that reaches loss L in the fewest tokens."""

    a: float
    b: float

    def batch_size(self, loss):
        return self.a / np.asarray(loss, dtype=float) ** self.b


PAPER_BATCH_SIZE_LAW = BatchSizeLaw(a=1.21e9, b=6.24)


def fit_batch_size_law(loss: Sequence[float], batch_tokens: Sequence[float]) -> BatchSizeLaw:
    """Least squares of log bs = log a - b log L (a straight line in log-log)."""
    loss, batch_tokens = (np.asarray(v, dtype=float).ravel() for v in (loss, batch_tokens))
    if len(loss) != len(batch_tokens) or len(loss) < 2:
        raise FitError(f"need at least 2 (loss, batch size) pairs of equal length, got {len(loss)} and "
                       f"{len(batch_tokens)}")
    if np.any(loss <= 0) or np.any(batch_tokens <= 0):
        raise FitError("losses and batch sizes must be positive")
    if len(np.unique(loss)) < 2:
        raise FitError("need at least two different losses")
    slope, intercept = np.polyfit(np.log(loss), np.log(batch_tokens), 1)
    return BatchSizeLaw(a=math.exp(intercept), b=-float(slope))
