"""Small problems with known answers, shared by the optimizer tests."""
from __future__ import annotations

import torch


class Quadratic(torch.nn.Module):
    """L(θ) = ½ (θ−θ*)ᵀ H (θ−θ*) + c over one or more parameter tensors (float64)."""

    def __init__(self, sizes, seed: int, offset: float = 1.0, curvature: float = 1.0):
        """θ starts at θ* + offset·N(0, I): offset sets the distance to the minimum."""
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = sum(sizes)
        q = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.register_buffer("H", curvature * (q @ q.T / n + 0.1 * torch.eye(n, dtype=torch.float64)))
        self.register_buffer("target", torch.randn(n, generator=g, dtype=torch.float64))
        self.params = torch.nn.ParameterList(
            torch.nn.Parameter(t + offset * torch.randn(t.numel(), generator=g, dtype=torch.float64))
            for t in self.target.split(list(sizes)))
        self.c = float(torch.rand((), generator=g))

    def flat(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.params])

    def loss_at(self, theta: torch.Tensor) -> torch.Tensor:
        r = theta - self.target
        return 0.5 * r @ (self.H @ r) + self.c

    def forward(self) -> torch.Tensor:
        return self.loss_at(self.flat())


def batches(n_calls: int, n: int, dim: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, dim, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))
            for _ in range(n_calls)]


def small_net(seed: int, dropout: float = 0.0, batchnorm: bool = False, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 16)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(16))
    layers += [torch.nn.Tanh()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    layers.append(torch.nn.Linear(16, 3))
    return torch.nn.Sequential(*layers).to(dtype)


def closure_for(model, x, y):
    def closure():
        return torch.nn.functional.cross_entropy(model(x), y)
    return closure


def labpal_entry(state_dict):
    """LABPAL's own entry of a state_dict() (since version 4 in the first parameter group)."""
    return state_dict["param_groups"][0]["labpal"]
