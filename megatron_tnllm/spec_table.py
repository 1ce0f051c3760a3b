"""Which model each ``--spec megatron_tnllm.specs NAME`` builds: the one table that every reader of a spec NAME uses.

:mod:`megatron_tnllm.specs` builds its block-spec callables from :data:`SPECS`; the converter reads the embedding
scale a checkpoint's ``--spec`` implies and picks the NAME to record for a model; :mod:`megatron_tnllm.flops`
counts the LRPE layers of the NAME. Like Megatron's ``get_linear_attention_pattern``, the layout is decided here
once and read by all. This module imports no megatron-core, so the FLOP counter (called from Megatron's training
loop) and the converter read it without building a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_tnllm.configs import HYBRID_PRESETS, PRESETS, TNLConfig, softmax_every

__all__ = ["SPECS", "SPEC_MODULE", "SpecInfo", "spec_for", "spec_info", "spec_of_args"]

SPEC_MODULE = "megatron_tnllm.specs"


@dataclass(frozen=True)
class SpecInfo:
    """One spec NAME and the model it builds.

    Attributes:
        name: the NAME in ``--spec MODULE NAME``.
        preset: the preset whose shape the spec checks (layers, width, heads, SGLU width); None: any shape.
        lrpe_layers: 0-based indices of the layers with LRPE.
        scale_embedding: embeddings scaled by sqrt(hidden size) (else by 1).
        softmax_layers: 0-based indices of the layers with softmax attention instead of the token mixer
            (hybrid layouts; empty for TNL).
        softmax_every: for a shape-free hybrid, softmax attention on the last of every ``softmax_every`` layers
            (:func:`megatron_tnllm.configs.softmax_every`); 0: use ``softmax_layers``.
        module: the MODULE in ``--spec MODULE NAME`` that defines the NAME.
    """

    name: str
    preset: TNLConfig | None = None
    lrpe_layers: tuple[int, ...] = (0,)
    scale_embedding: bool = False
    softmax_layers: tuple[int, ...] = ()
    module: str = SPEC_MODULE
    softmax_every: int = 0

    def softmax_layers_of(self, num_layers: int) -> tuple[int, ...]:
        """The softmax-attention layers of a model of ``num_layers`` layers built by this spec."""
        return softmax_every(num_layers, self.softmax_every) if self.softmax_every else self.softmax_layers

    def embedding_scale(self, hidden_size: int) -> float:
        """The factor on the token embeddings of a model ``hidden_size`` wide."""
        return math.sqrt(hidden_size) if self.scale_embedding else 1.0

    def builds(self, tnl: TNLConfig) -> bool:
        """Whether this spec builds ``tnl`` (any vocabulary, norm epsilon and sequence length)."""
        layout = (self.lrpe_layers, self.scale_embedding, self.softmax_layers_of(tnl.num_layers))
        if layout != (tnl.lrpe_layers, tnl.scale_embedding, tnl.softmax_layers):
            return False
        shape = ("num_layers", "hidden_size", "num_heads", "glu_size")
        return self.preset is None or all(getattr(self.preset, f) == getattr(tnl, f) for f in shape)

    def describe(self) -> str:
        """One line for the spec's docstring."""
        shape = f"preset {self.preset.name} (checks the shape)" if self.preset else "any shape"
        scale = "embeddings scaled by sqrt(hidden size)" if self.scale_embedding else "no embedding scale"
        lrpe = ", ".join(map(str, self.lrpe_layers)) or "none"
        if self.softmax_every:
            softmax = f"; softmax attention on every {self.softmax_every}th layer"
        elif self.softmax_layers:
            softmax = f"; softmax attention on layers {', '.join(map(str, self.softmax_layers))}"
        else:
            softmax = ""
        return f"Block spec of {shape}: LRPE on layers {lrpe}, {scale}{softmax}."


def _of_preset(preset: TNLConfig) -> SpecInfo:
    return SpecInfo(
        preset.spec_name, preset, preset.lrpe_layers, preset.scale_embedding, preset.softmax_layers, SPEC_MODULE
    )


# Presets first: spec_for names a model by its preset when it has one, by a shape-free spec otherwise.
SPECS: dict[str, SpecInfo] = {
    s.name: s
    for s in (
        *(_of_preset(p) for p in PRESETS.values()),
        SpecInfo("tnl"),  # the 7B/3B settings at any shape
        SpecInfo("tnl_scaled_embedding", scale_embedding=True),  # the 1B/385M settings at any shape
        *(_of_preset(p) for p in HYBRID_PRESETS.values()),  # softmax attention on every 8th layer (MiniMax-01)
        SpecInfo("tnl_hybrid", softmax_every=8),  # the same at any shape
        SpecInfo("tnl_hybrid_scaled_embedding", scale_embedding=True, softmax_every=8),  # with the 1B/385M scale
    )
}


def spec_info(name: str) -> SpecInfo:
    """The table row of spec ``name`` (KeyError naming the known specs if there is none)."""
    if name not in SPECS:
        raise KeyError(f"unknown spec {name!r}; expected one of {', '.join(SPECS)}")
    return SPECS[name]


def spec_of_args(spec: list[str] | tuple[str, ...] | None) -> SpecInfo | None:
    """The row of a ``pretrain_gpt.py`` ``args.spec`` ([MODULE, NAME]); None when it is not a spec of this table."""
    if not spec or len(spec) != 2:
        return None
    info = SPECS.get(spec[1])
    return info if info is not None and info.module == spec[0] else None


def spec_for(tnl: TNLConfig) -> SpecInfo | None:
    """The spec that builds ``tnl``: its preset's if its shape and layout are a preset's, else the shape-free spec
    with its layout; None when no spec builds it."""
    return next((s for s in SPECS.values() if s.builds(tnl)), None)
