"""The fixed per-head decay of TNL's token mixer (docs/model.md §1.1): lambda = exp(-slope)."""

from __future__ import annotations

import math


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes m_h: 2^(-8(h+1)/H) for H a power of two; otherwise the slopes of the largest
    power of two P < H followed by every other slope of the 2P list (the first H - P of them)."""
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    p = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(p) + power_of_two(2 * p)[0::2][: num_heads - p]


def layer_slopes(num_heads: int, layer_index: int, num_layers: int) -> list[float]:
    """slope_{h,l} = m_h * (1 - l / (L - 1) + 1e-5) for 0-based layer l of L (released-checkpoint form).

    A one-layer model (L = 1) uses the first-layer temperature (the HF code would divide by zero).
    """
    if not 0 <= layer_index < num_layers:
        raise ValueError(f"layer_index {layer_index} outside 0..{num_layers - 1}")
    temperature = 1 - layer_index / max(num_layers - 1, 1) + 1e-5
    return [m * temperature for m in alibi_slopes(num_heads)]
