"""DAS runtime pieces shared by every backbone: adapters and the per-plan module bundle.

A *skip adapter* replaces a whole skipped transformer block:  y = x + up(ReLU(down(LN(x)))).
A *parallel adapter* sits beside a sub-block of a kept layer; its output (without the residual)
is added to the residual stream next to the sub-block's own output.
"""

from __future__ import annotations

import torch
from torch import nn

ADAPTER_INIT_STD = 0.02  # N(0, 0.02), as in the DAS reference code


class Adapter(nn.Module):
    """Bottleneck MLP with a LayerNorm on its input: up(ReLU(down(LN(x)))). No residual."""

    def __init__(self, hidden_size: int, bottleneck: int, layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        for linear in (self.down, self.up):
            nn.init.normal_(linear.weight, std=ADAPTER_INIT_STD)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(self.norm(x))))


class SkipAdapter(Adapter):
    """Stands in for a skipped transformer block: x + adapter(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class ParallelAdapters(nn.Module):
    """The two parallel adapters of one kept layer: beside attention and beside the MLP."""

    def __init__(self, hidden_size: int, bottleneck: int, layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.attention = Adapter(hidden_size, bottleneck, layer_norm_eps)
        self.mlp = Adapter(hidden_size, bottleneck, layer_norm_eps)


class PlanModules(nn.Module):
    """Everything one plan adds to the frozen backbone, and nothing else.

    Holds skip adapters (keyed by skipped layer index), parallel adapters (keyed by kept layer
    index) and, optionally, the plan's own copies of the small per-task parts the method trains
    (pooler, modality token-type embeddings, task head; a LaVIN plan's mixture-of-modality adapters,
    keyed by kept layer index). A part that is ``None`` (or a layer missing from ``mma_adapters``)
    means "use the backbone's". The backbone's own weights are never referenced here.
    """

    def __init__(
        self,
        skip_adapters: dict[int, SkipAdapter] | None = None,
        parallel_adapters: dict[int, ParallelAdapters] | None = None,
        pooler: nn.Module | None = None,
        token_type_embeddings: nn.Embedding | None = None,
        head: nn.Module | None = None,
        mma_adapters: dict[int, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.skip_adapters = nn.ModuleDict({str(i): m for i, m in sorted((skip_adapters or {}).items())})
        self.parallel_adapters = nn.ModuleDict(
            {str(i): m for i, m in sorted((parallel_adapters or {}).items())}
        )
        self.pooler = pooler
        self.token_type_embeddings = token_type_embeddings
        self.head = head
        self.mma_adapters = nn.ModuleDict({str(i): m for i, m in sorted((mma_adapters or {}).items())})

    def skip_adapter(self, layer_index: int) -> SkipAdapter | None:
        return self.skip_adapters[str(layer_index)] if str(layer_index) in self.skip_adapters else None

    def parallel_adapter(self, layer_index: int) -> ParallelAdapters | None:
        key = str(layer_index)
        return self.parallel_adapters[key] if key in self.parallel_adapters else None

    def mma_adapter(self, layer_index: int) -> nn.Module | None:
        key = str(layer_index)
        return self.mma_adapters[key] if key in self.mma_adapters else None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
