"""The torch modules tuneline adds to models, at module level: the bottleneck adapter and the fast adapter dropout.
This module imports torch: only the trainers and loaders import it, inside their functions."""

from __future__ import annotations

import torch


class BottleneckAdapter(torch.nn.Module):
    """``h + up(act(down(h)))``; ``up`` starts at zero, so a fresh adapter is the identity."""

    def __init__(self, hidden: int, reduction_factor: int, activation: str) -> None:
        super().__init__()
        width = max(1, hidden // reduction_factor)
        self.down = torch.nn.Linear(hidden, width)
        self.act = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU,
                    "tanh": torch.nn.Tanh}[activation]()
        self.up = torch.nn.Linear(width, hidden)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, hidden):
        return hidden + self.up(self.act(self.down(hidden)))


class FastDropout(torch.nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536) - 32768  # int16 draws below this are dropped
        self.scale = 1.0 / (1.0 - round(p * 65536) / 65536)

    def forward(self, x):
        if not self.training:
            return x
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        keep = words.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return x * (keep.to(x.dtype) * self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"
