"""The ALiBi slopes of the decay (docs/model.md §1.1) at a head count that is not a power of two."""

import pytest

from megatron_tnllm.ops.decay import alibi_slopes, layer_slopes


def test_alibi_slopes_of_20_heads():
    """tnl-3b has 20 heads: the 16 slopes 2^(-8 (h + 1) / 16), then slopes 0, 2, 4, 6 of the 32-head list
    2^(-8 (h + 1) / 32), i.e. 2^(-1/4), 2^(-3/4), 2^(-5/4), 2^(-7/4)."""
    expected = [2.0 ** (-(h + 1) / 2) for h in range(16)] + [2.0 ** (-e / 4) for e in (1, 3, 5, 7)]
    assert alibi_slopes(20) == pytest.approx(expected, rel=1e-12)
    assert alibi_slopes(20)[16:] == pytest.approx([0.840896, 0.594604, 0.420448, 0.297302], abs=1e-6)


def test_alibi_slopes_of_a_power_of_two_and_of_40_heads():
    """8 heads: 1/2, 1/4, ..., 1/256; 40 heads (tnl-13b): the 32-head list, then slopes 0, 2, ..., 14 of the 64."""
    assert alibi_slopes(8) == pytest.approx([2.0 ** -(h + 1) for h in range(8)], rel=1e-12)
    expected = [2.0 ** (-(h + 1) / 4) for h in range(32)] + [2.0 ** (-(2 * j + 1) / 8) for j in range(8)]
    assert alibi_slopes(40) == pytest.approx(expected, rel=1e-12)


def test_layer_slopes_scale_from_first_to_last_layer():
    """slope_{h,l} = m_h (1 - l / (L - 1) + 1e-5): the full slope on layer 0, 1e-5 of it on the last."""
    m = alibi_slopes(20)
    assert layer_slopes(20, 0, 32) == pytest.approx([x * (1 + 1e-5) for x in m], rel=1e-12)
    assert layer_slopes(20, 31, 32) == pytest.approx([x * 1e-5 for x in m], rel=1e-9)
    with pytest.raises(ValueError, match="layer_index 32 outside 0..31"):
        layer_slopes(20, 32, 32)
