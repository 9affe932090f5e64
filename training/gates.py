"""The hard-concrete gate (Louizos et al. 2018, as used by CoFiPruning): one class for heads and FFN neurons."""

from __future__ import annotations

import math

import torch
from torch import nn

GAMMA, ZETA = -0.1, 1.1  # stretch limits of the concrete distribution
BETA = 2.0 / 3.0  # temperature
EPSILON = 1e-6
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(0.01), math.log(100.0)


class HardConcreteGate(nn.Module):
    """Hard-concrete gates z ∈ [0, 1] with learnable log α of any shape.

    * training sample: u ~ U(ε, 1−ε); s = σ((log u − log(1−u) + log α)/β); z = min(1, max(0, s·(ζ−γ) + γ));
    * keep probability: P(z > 0) = 1 − σ(β·log(−γ/ζ) − log α);
    * deterministic mask (evaluation / export), per row of the last dimension: zero the round(n − Σ P(z>0)) gates with
      the lowest σ(log α / β · 0.8), keep the others at exactly 1.

    Args:
        shape: shape of log α (e.g. (num_heads,) for one layer).
        init_mean: initial log α (heads: 10, i.e. almost surely kept).
        drop_rate: alternatively, initial drop probability p: log α = log(1 − p) − log p (FFN: p = 0.5 → 0).
        init_std: std of the small noise added at init (breaks ties between identical gates).
    """

    def __init__(
        self,
        shape: tuple[int, ...] | int,
        init_mean: float | None = 10.0,
        drop_rate: float | None = None,
        init_std: float = 0.01,
    ):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if drop_rate is not None:
            if not 0.0 < drop_rate < 1.0:
                raise ValueError(f"drop_rate must lie in (0, 1), got {drop_rate}")
            mean = math.log(1 - drop_rate) - math.log(drop_rate)
        elif init_mean is not None:
            mean = float(init_mean)
        else:
            raise ValueError("give init_mean or drop_rate")
        self.log_alpha = nn.Parameter(torch.full(shape, mean) + init_std * torch.randn(shape))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One stochastic gate sample of log α's shape (differentiable w.r.t. log α)."""
        u = torch.rand(self.log_alpha.shape, generator=generator).to(self.log_alpha.device)
        u = u.clamp(EPSILON, 1 - EPSILON)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def keep_probability(self) -> torch.Tensor:
        """P(z > 0) per gate (differentiable): the expected L0 contribution of each unit."""
        return 1 - torch.sigmoid(BETA * math.log(-GAMMA / ZETA) - self.log_alpha)

    def expected_l0(self) -> torch.Tensor:
        """Expected number of non-zero gates."""
        return self.keep_probability().sum()

    @torch.no_grad()
    def deterministic(self) -> torch.Tensor:
        """Exact 0/1 mask: along the last dimension keep the round(Σ P(z>0)) highest-scoring gates."""
        log_alpha = self.log_alpha.detach()
        rows = log_alpha.reshape(-1, log_alpha.shape[-1]) if log_alpha.dim() else log_alpha.reshape(1, 1)
        kept = self.keep_probability().detach().reshape(rows.shape).sum(-1).round().long()
        score = torch.sigmoid(rows / BETA * 0.8)
        mask = torch.zeros_like(rows)
        order = score.argsort(dim=-1, descending=True)
        for row, (k, idx) in enumerate(zip(kept.tolist(), order)):
            mask[row, idx[:k]] = 1.0
        return mask.reshape(log_alpha.shape)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamps log α to [log 0.01, log 100] in place (after each optimizer step)."""
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def forward(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample(generator) if self.training else self.deterministic()
