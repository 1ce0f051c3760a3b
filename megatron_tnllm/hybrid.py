"""Hybrid TNL: lightning attention in most layers, softmax attention in a few (the MiniMax-01 layout).

The placement is a set of 0-based global layer indices (``TNLConfig.softmax_layers``; the presets'
``*-hybrid`` variants put one softmax layer after every seven TNL layers, see
:func:`megatron_tnllm.configs.softmax_every`). Every layer is built from one layer spec whose
``self_attention`` is :class:`MixerByLayer`: given Megatron's global ``layer_number`` (which includes the
pipeline and virtual-pipeline offset) it builds :class:`~megatron_tnllm.layers.softmax_attention.SoftmaxAttention`
or TNL's :class:`~megatron_tnllm.layers.token_mixer.TokenMixer`. So a pipeline stage builds exactly its own
layers (a per-layer list of specs would be built whole on every stage). The rest of each layer (SRMSNorm,
SGLU, residuals, the embedding scale on layer 1) is TNL's.

The ``--spec megatron_tnllm.specs NAME`` callables of the hybrids (``tnl_tiny_hybrid`` ... ``tnl_175b_hybrid``,
``tnl_hybrid``) are rows of :data:`megatron_tnllm.spec_table.SPECS`, built by :mod:`megatron_tnllm.specs` with
:func:`megatron_tnllm.specs.hybrid_block_spec` from :func:`hybrid_layer_spec`.
"""

from __future__ import annotations

import dataclasses

from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_tnllm.layers.softmax_attention import SoftmaxAttention, SoftmaxAttentionSubmodules

__all__ = ["SOFTMAX_ATTENTION", "MixerByLayer", "hybrid_layer_spec"]

SOFTMAX_ATTENTION = ModuleSpec(module=SoftmaxAttention, submodules=SoftmaxAttentionSubmodules())


class MixerByLayer:
    """The ``self_attention`` of a hybrid layer: builds ``softmax`` on the softmax layers, ``linear`` elsewhere.

    Megatron builds a layer's ``self_attention`` with ``build_module(spec, config=..., layer_number=...)``,
    which needs a class; this one's constructor returns the chosen module (an instance of another class,
    so Python does not call ``MixerByLayer.__init__``), and the model holds no wrapper: checkpoint keys are
    those of the module built.

    Args (the spec's params): softmax_layers: 0-based global indices; linear, softmax: the two module specs.
    """

    def __new__(
        cls,
        config: TransformerConfig,
        layer_number: int,
        *,
        softmax_layers: frozenset[int],
        linear: ModuleSpec,
        softmax: ModuleSpec,
        **kwargs,
    ):
        spec = softmax if layer_number - 1 in softmax_layers else linear
        return build_module(spec, config=config, layer_number=layer_number, **kwargs)


def hybrid_layer_spec(layer: ModuleSpec, softmax_layers: tuple[int, ...]) -> ModuleSpec:
    """``layer`` (a TNL layer spec) with softmax attention instead of its token mixer on ``softmax_layers``."""
    mixer = ModuleSpec(
        module=MixerByLayer,
        params={
            "softmax_layers": frozenset(softmax_layers),
            "linear": layer.submodules.self_attention,
            "softmax": SOFTMAX_ATTENTION,
        },
    )
    return dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, self_attention=mixer))
