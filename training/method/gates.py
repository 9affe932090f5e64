"""The hard-concrete gate (Louizos et al. 2018, as used by CoFiPruning): one class for heads and FFN neurons."""

from __future__ import annotations

import math

import torch
from torch import nn

GAMMA, ZETA = -0.1, 1.1  # stretch limits of the concrete distribution: z can be exactly 0 or 1
BETA = 2.0 / 3.0  # temperature
EPSILON = 1e-6  # keeps u away from 0 and 1 so log u and log(1 − u) stay finite
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(0.01), math.log(100.0)


def _keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0) = 1 − σ(β·log(−γ/ζ) − log α), elementwise."""
    return 1 - torch.sigmoid(BETA * math.log(-GAMMA / ZETA) - log_alpha)


class HardConcreteGate(nn.Module):
    """Hard-concrete gates z ∈ [0, 1] with learnable log α of any shape (one gate per entry).

    * training sample: u ~ U(ε, 1−ε); s = σ((log u − log(1−u) + log α)/β); z = min(1, max(0, s·(ζ−γ) + γ));
    * keep probability: P(z > 0) = 1 − σ(β·log(−γ/ζ) − log α), the expected L0 contribution of each gate;
    * deterministic mask (evaluation / export), per row along one dimension: zero the round(n − Σ P(z>0)) gates
      with the lowest σ(log α / β · 0.8), keep the others at exactly 1.

    Args:
        shape: shape of log α, e.g. (num_heads,) for one layer or (num_layers, num_heads).
        init_mean: initial log α (heads: 10, i.e. almost surely kept). Ignored when `drop_rate` is given.
        drop_rate: initial drop probability p instead: log α = log(1 − p) − log p (FFN neurons: p = 0.5 → 0).
        init_std: std of the normal noise added at init (CoFi: 0.01; breaks ties between identical gates).

    Raises:
        ValueError: `drop_rate` outside (0, 1), neither initialisation given, or a negative `init_std`.
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
            raise ValueError("HardConcreteGate needs init_mean or drop_rate")
        if init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        self.log_alpha = nn.Parameter(torch.full(shape, mean) + init_std * torch.randn(shape))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One stochastic gate sample (one per call: shared by the whole batch), differentiable w.r.t. log α.

        Args:
            generator: for reproducible noise; u is drawn on its device and moved to log α's.

        Returns:
            z of log α's shape, in [0, 1], with exact 0s and 1s occurring.
        """
        log_alpha = self.log_alpha
        device = generator.device if generator is not None else log_alpha.device
        u = torch.rand(log_alpha.shape, generator=generator, device=device).to(log_alpha.device)
        u = u * (1 - 2 * EPSILON) + EPSILON  # U(ε, 1 − ε)
        # fp32 for the logistic noise: log(1 − u) near u ≈ 1 is coarse in half precision
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha.float()) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0).to(log_alpha.dtype)

    def keep_probability(self) -> torch.Tensor:
        """P(z > 0) = 1 − σ(β·log(−γ/ζ) − log α) per gate, of log α's shape (differentiable)."""
        return _keep_probability(self.log_alpha)

    def expected_l0(self) -> torch.Tensor:
        """Expected number of non-zero gates, Σ P(z > 0) (scalar, differentiable)."""
        return self.keep_probability().sum()

    @torch.no_grad()
    def deterministic(self, dim: int = -1, multiple: int = 1) -> torch.Tensor:
        """Exact 0/1 mask: in every row along `dim`, zero the round(n − Σ P(z>0)) lowest-scoring gates.

        The score σ(log α / β · 0.8) is monotone in log α, so ranking by log α gives the same order without σ's
        float saturation creating ties; among equal log α the lower index is kept first, deterministically.

        Args:
            dim: the dimension whose rows are budgeted independently (default: last, e.g. the heads of one layer
                in a (num_layers, num_heads) gate). A 0-d log α is a single gate.
            multiple: keep a multiple of this many gates per row (the nearest to Σ P(z>0), at least one multiple
                unless the row is shorter): hidden-dimension gates keep widths that dense kernels tile well.

        Returns:
            Mask of log α's shape and dtype holding only 0.0 and 1.0 (no gradient).
        """
        log_alpha = self.log_alpha.detach()
        rows = log_alpha.reshape(1) if log_alpha.dim() == 0 else log_alpha
        size = rows.shape[dim]
        # round() is half-to-even, like Python's round in the reference (CoFi) code
        num_zeros = torch.round(size - _keep_probability(rows.float()).sum(dim, keepdim=True))
        if multiple > 1:
            kept = (torch.round((size - num_zeros) / multiple) * multiple).clamp(min(multiple, size), size)
            num_zeros = size - kept
        # rank 0 = highest log α; the stable sort ranks tied gates by index
        rank = (-rows).argsort(dim=dim, stable=True).argsort(dim=dim, stable=True)
        return (rank < size - num_zeros).to(log_alpha.dtype).reshape(log_alpha.shape)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamps log α to [log 0.01, log 100] in place (after each optimizer step)."""
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def forward(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A sample in training mode, the deterministic mask (along the last dimension) in eval mode."""
        return self.sample(generator) if self.training else self.deterministic()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.log_alpha.shape)}"
