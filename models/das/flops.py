"""Analytic FLOPs accounting.

Unit: FLOPs, one multiply-add = 2 FLOPs (the convention of ``torch.utils.flop_counter``; fvcore
counts multiply-adds, i.e. half of this). Counted: every matrix multiplication (linear layers,
attention scores and attention-weighted values, the patch-embedding convolution). Not counted:
element-wise work (norms, softmax, activations, additions, position-embedding interpolation), which
is what both reference counters leave out too and is well under 1% at real sizes.

Costs depend on the sequence length, so every count here is a function of the actual number of
text tokens and image patches of a request. Architecture modules (``models/backbones/vilt/``,
``models/backbones/meter/``) compose these building blocks into per-request reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    """A dense layer applied to ``tokens`` vectors."""
    return 2 * tokens * in_features * out_features


def self_attention_flops(seq_len: int, hidden: int) -> int:
    """Q, K, V and output projections plus the two (seq x seq) attention products."""
    projections = 4 * linear_flops(seq_len, hidden, hidden)
    scores_and_mix = 2 * (2 * seq_len * seq_len * hidden)
    return projections + scores_and_mix


def cross_attention_flops(query_len: int, context_len: int, hidden: int) -> int:
    """Q and output projections over the queries, K and V over the other stream's tokens, plus the
    two (query_len x context_len) attention products (a co-attention layer, e.g. METER's)."""
    projections = 2 * linear_flops(query_len, hidden, hidden) + 2 * linear_flops(context_len, hidden, hidden)
    scores_and_mix = 2 * (2 * query_len * context_len * hidden)
    return projections + scores_and_mix


def mlp_flops(seq_len: int, hidden: int, intermediate: int) -> int:
    return linear_flops(seq_len, hidden, intermediate) + linear_flops(seq_len, intermediate, hidden)


def transformer_layer_flops(seq_len: int, hidden: int, intermediate: int) -> int:
    return self_attention_flops(seq_len, hidden) + mlp_flops(seq_len, hidden, intermediate)


def adapter_flops(seq_len: int, hidden: int, bottleneck: int) -> int:
    """down + up projection of one bottleneck adapter (skip or parallel)."""
    return linear_flops(seq_len, hidden, bottleneck) + linear_flops(seq_len, bottleneck, hidden)


def gqa_attention_flops(query_len: int, context_len: int, hidden: int, num_heads: int, num_kv_heads: int,
                        head_dim: int) -> int:
    """Grouped-query self-attention of ``query_len`` new positions over ``context_len`` keys (a decoder
    step reads the cached keys/values of earlier positions): Q and output projections of the
    ``num_heads`` heads, K and V projections of the ``num_kv_heads`` heads (new positions only), and
    the two (query_len x context_len) products per query head. Prefill is ``query_len ==
    context_len``; the causal mask does not change the count (the fused kernels compute it all)."""
    projections = 2 * linear_flops(query_len, hidden, num_heads * head_dim)
    projections += 2 * linear_flops(query_len, hidden, num_kv_heads * head_dim)
    scores_and_mix = 2 * (2 * query_len * context_len * num_heads * head_dim)
    return projections + scores_and_mix


def gated_mlp_flops(tokens: int, hidden: int, intermediate: int) -> int:
    """A gated MLP (Llama's SwiGLU): gate and up projections, then down."""
    return 2 * linear_flops(tokens, hidden, intermediate) + linear_flops(tokens, intermediate, hidden)


def conv_patch_flops(num_patches: int, channels: int, patch_size: int, hidden: int) -> int:
    """A patch-embedding convolution with kernel = stride = patch_size."""
    return linear_flops(num_patches, channels * patch_size * patch_size, hidden)


def conv_stem_flops(rows: int, cols: int, in_channels: int, channels: tuple[int, ...] | list[int], hidden: int) -> int:
    """A convolutional stem (models/backbones/conv_stem.py) whose output grid is ``rows`` x ``cols``:
    3x3 stride-2 convolutions, the k-th of n at (rows * 2^(n-1-k)) x (cols * 2^(n-1-k)) outputs, then a 1x1
    projection to ``hidden`` at the grid, plus the linear patch embedding beside it."""
    total, width, n = 0, in_channels, len(channels)
    for k, out in enumerate(channels):
        scale = 2 ** (n - 1 - k)
        total += linear_flops(rows * scale * cols * scale, width * 9, out)
        width = out
    patch_size = 2 ** n
    return total + linear_flops(rows * cols, width, hidden) + conv_patch_flops(rows * cols, in_channels, patch_size, hidden)


def patch_embedding_flops(rows: int, cols: int, in_channels: int, patch_size: int, hidden: int,
                          stem_channels: tuple[int, ...] | list[int] = ()) -> int:
    """The image's patch embedding at a ``rows`` x ``cols`` grid: the linear one (a patch-sized convolution),
    or the convolutional stem of ``stem_channels`` where there is one."""
    if stem_channels:
        return conv_stem_flops(rows, cols, in_channels, stem_channels, hidden)
    return conv_patch_flops(rows * cols, in_channels, patch_size, hidden)


@dataclass(frozen=True)
class LayerFlops:
    """Cost of one backbone layer: as in the full model and as executed under a plan."""

    index: int
    full: int
    executed: int
    skipped: bool

    def __add__(self, other: LayerFlops) -> LayerFlops:
        assert self.index == other.index and self.skipped == other.skipped
        return LayerFlops(self.index, self.full + other.full, self.executed + other.executed, self.skipped)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "full": self.full, "executed": self.executed, "skipped": self.skipped}


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs of one request (all its forward passes plus the head), full model vs plan.

    ``other`` is the part that runs the same under every plan (embeddings, pooler, head).
    """

    per_layer: tuple[LayerFlops, ...]
    other: int
    seq_lens: tuple[int, ...] = field(default=())

    @property
    def full(self) -> int:
        return self.other + sum(layer.full for layer in self.per_layer)

    @property
    def executed(self) -> int:
        return self.other + sum(layer.executed for layer in self.per_layer)

    @property
    def saved(self) -> int:
        return self.full - self.executed

    @property
    def saved_ratio(self) -> float:
        return self.saved / self.full if self.full else 0.0

    def __add__(self, other: FlopsReport) -> FlopsReport:
        if len(self.per_layer) != len(other.per_layer):
            raise ValueError("cannot add FLOPs reports of backbones with different depths")
        return FlopsReport(
            per_layer=tuple(a + b for a, b in zip(self.per_layer, other.per_layer)),
            other=self.other + other.other,
            seq_lens=self.seq_lens + other.seq_lens,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": "FLOPs (1 multiply-add = 2 FLOPs)",
            "full_flops": self.full,
            "executed_flops": self.executed,
            "saved_flops": self.saved,
            "saved_ratio": self.saved_ratio,
            "seq_lens": list(self.seq_lens),
            "other_flops": self.other,
            "per_layer": [layer.to_dict() for layer in self.per_layer],
        }
