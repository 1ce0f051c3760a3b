"""Layer and block specs: what ``pretrain_gpt.py --spec megatron_tnllm.specs NAME`` builds.

Every NAME below is a callable ``NAME(config, vp_stage=None)`` returning the
``TransformerBlockSubmodules`` of this pipeline stage: TNL decoder layers and a weightless final
SRMSNorm (a plain layer spec would get Megatron's default final norm, which has a weight). Which
LRPE layers and embedding scale a NAME means is the row of :data:`megatron_tnllm.spec_table.SPECS`:

* ``tnl_tiny``, ``tnl_385m``, ``tnl_1b``, ``tnl_3b``, ``tnl_7b``, ``tnl_13b``, ``tnl_65b``,
  ``tnl_175b``: the presets of :mod:`megatron_tnllm.configs`. They check that the command line's
  shape (``--num-layers``, ``--hidden-size``, ...) is the preset's and add its LRPE layers and
  embedding scale.
* ``tnl``: any shape; LRPE on layer 0, no embedding scale (the 7B/3B settings).
* ``tnl_scaled_embedding``: any shape; LRPE on layer 0, embeddings scaled by sqrt(hidden size).
* ``tnl_tiny_hybrid`` ... ``tnl_175b_hybrid``: the hybrid presets (softmax attention on every 8th layer, the
  MiniMax-01 layout; :mod:`megatron_tnllm.hybrid`), shape checked; ``tnl_hybrid``: the same at any shape;
  ``tnl_hybrid_scaled_embedding``: the same with embeddings scaled by sqrt(hidden size).
"""

from __future__ import annotations

import functools

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megatron_tnllm.configs import TNLConfig
from megatron_tnllm.hybrid import hybrid_layer_spec
from megatron_tnllm.layers.norms import SRMSNorm
from megatron_tnllm.layers.sglu import SGLU
from megatron_tnllm.layers.token_mixer import TokenMixer, TokenMixerSubmodules
from megatron_tnllm.layers.transformer_layer import TNLTransformerLayer
from megatron_tnllm.spec_table import SPECS, SpecInfo

__all__ = [
    "hybrid_block_spec",
    "tnl",
    "tnl_13b",
    "tnl_13b_hybrid",
    "tnl_175b",
    "tnl_175b_hybrid",
    "tnl_1b",
    "tnl_1b_hybrid",
    "tnl_385m",
    "tnl_385m_hybrid",
    "tnl_3b",
    "tnl_3b_hybrid",
    "tnl_65b",
    "tnl_65b_hybrid",
    "tnl_7b",
    "tnl_7b_hybrid",
    "tnl_block_spec",
    "tnl_hybrid",
    "tnl_hybrid_scaled_embedding",
    "tnl_layer_spec",
    "tnl_scaled_embedding",
    "tnl_tiny",
    "tnl_tiny_hybrid",
]


def tnl_layer_spec(lrpe_layers: tuple[int, ...] = (0,), embedding_scale: float = 1.0) -> ModuleSpec:
    """One TNL decoder layer (local Megatron linears): SRMSNorm -> token mixer -> SRMSNorm -> SGLU."""
    return ModuleSpec(
        module=TNLTransformerLayer,
        params={"embedding_scale": embedding_scale},
        submodules=TransformerLayerSubmodules(
            input_layernorm=SRMSNorm,
            self_attention=ModuleSpec(
                module=TokenMixer,
                params={"lrpe_layers": tuple(lrpe_layers)},
                submodules=TokenMixerSubmodules(qkvu_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=SRMSNorm,
            mlp=functools.partial(
                SGLU.as_mlp_submodule,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def tnl_block_spec(
    config, vp_stage: int | None = None, *, lrpe_layers: tuple[int, ...] = (0,), embedding_scale: float = 1.0
) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline (and virtual pipeline) stage.

    ``config`` is a ``TransformerConfig`` or anything with one under ``.transformer`` (the
    ``GPTModelConfig`` of ``pretrain_gpt.py``). Sets per-layer checkpoint keys on it, since
    layers with LRPE own a parameter the others lack.
    """
    tcfg = getattr(config, "transformer", config)
    bad = [i for i in lrpe_layers if not 0 <= i < tcfg.num_layers]
    if bad:
        raise ValueError(f"LRPE layers {bad} outside 0..{tcfg.num_layers - 1}")
    tcfg.hetereogenous_dist_checkpoint = True
    layer = tnl_layer_spec(lrpe_layers, embedding_scale)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(tcfg, vp_stage=vp_stage), layer_norm=SRMSNorm
    )


def _check_shape(preset: TNLConfig, tcfg) -> None:
    expected = {
        "num_layers": (preset.num_layers, "--num-layers"),
        "hidden_size": (preset.hidden_size, "--hidden-size"),
        "num_attention_heads": (preset.num_heads, "--num-attention-heads"),
        "ffn_hidden_size": (preset.glu_size, "--ffn-hidden-size"),
        "kv_channels": (preset.head_dim, "--kv-channels"),
    }
    wrong = [
        f"{flag} {want} (got {getattr(tcfg, field)})"
        for field, (want, flag) in expected.items()
        if getattr(tcfg, field) != want
    ]
    if wrong:
        raise ValueError(f"spec {preset.spec_name} is preset {preset.name}, which needs " + ", ".join(wrong))


def hybrid_block_spec(
    config,
    vp_stage: int | None = None,
    *,
    softmax_layers: tuple[int, ...],
    lrpe_layers: tuple[int, ...] = (0,),
    embedding_scale: float = 1.0,
) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline (and virtual pipeline) stage, softmax attention on ``softmax_layers``.

    ``config`` as for :func:`tnl_block_spec`; with no softmax layers this is that block.
    """
    tcfg = getattr(config, "transformer", config)
    bad = [i for i in softmax_layers if not 0 <= i < tcfg.num_layers]
    if bad:
        raise ValueError(f"softmax layers {bad} outside 0..{tcfg.num_layers - 1}")
    both = sorted(set(softmax_layers) & set(lrpe_layers))
    if both:
        raise ValueError(f"layers {both} are both LRPE and softmax layers; expected disjoint sets")
    block = tnl_block_spec(config, vp_stage, lrpe_layers=lrpe_layers, embedding_scale=embedding_scale)
    if softmax_layers:
        block.layer_specs = [hybrid_layer_spec(spec, softmax_layers) for spec in block.layer_specs]
    return block


def _block_spec(info: SpecInfo):
    """The ``--spec`` callable of one row of the spec table."""

    def spec(config, vp_stage: int | None = None) -> TransformerBlockSubmodules:
        tcfg = getattr(config, "transformer", config)
        if info.preset is not None:
            _check_shape(info.preset, tcfg)
        scale = info.embedding_scale(tcfg.hidden_size)
        softmax_layers = info.softmax_layers_of(tcfg.num_layers)
        if softmax_layers:
            return hybrid_block_spec(
                config, vp_stage, softmax_layers=softmax_layers, lrpe_layers=info.lrpe_layers, embedding_scale=scale
            )
        return tnl_block_spec(config, vp_stage, lrpe_layers=info.lrpe_layers, embedding_scale=scale)

    spec.__name__ = spec.__qualname__ = info.name
    spec.__doc__ = info.describe()
    return spec


tnl_tiny = _block_spec(SPECS["tnl_tiny"])
tnl_385m = _block_spec(SPECS["tnl_385m"])
tnl_1b = _block_spec(SPECS["tnl_1b"])
tnl_3b = _block_spec(SPECS["tnl_3b"])
tnl_7b = _block_spec(SPECS["tnl_7b"])
tnl_13b = _block_spec(SPECS["tnl_13b"])
tnl_65b = _block_spec(SPECS["tnl_65b"])
tnl_175b = _block_spec(SPECS["tnl_175b"])
tnl = _block_spec(SPECS["tnl"])
tnl_scaled_embedding = _block_spec(SPECS["tnl_scaled_embedding"])
tnl_tiny_hybrid = _block_spec(SPECS["tnl_tiny_hybrid"])
tnl_385m_hybrid = _block_spec(SPECS["tnl_385m_hybrid"])
tnl_1b_hybrid = _block_spec(SPECS["tnl_1b_hybrid"])
tnl_3b_hybrid = _block_spec(SPECS["tnl_3b_hybrid"])
tnl_7b_hybrid = _block_spec(SPECS["tnl_7b_hybrid"])
tnl_13b_hybrid = _block_spec(SPECS["tnl_13b_hybrid"])
tnl_65b_hybrid = _block_spec(SPECS["tnl_65b_hybrid"])
tnl_175b_hybrid = _block_spec(SPECS["tnl_175b_hybrid"])
tnl_hybrid = _block_spec(SPECS["tnl_hybrid"])
tnl_hybrid_scaled_embedding = _block_spec(SPECS["tnl_hybrid_scaled_embedding"])
