"""Build a TNL ``GPTModel`` for the current Megatron parallel state."""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_tnllm.configs import TNLConfig, get_preset
from megatron_tnllm.specs import hybrid_block_spec

__all__ = ["build_model", "resolve_config"]

_TNL_FIELDS = {f.name for f in dataclasses.fields(TNLConfig)}


def resolve_config(preset_or_config: str | TNLConfig, **overrides) -> tuple[TNLConfig, dict]:
    """Split ``overrides`` into TNLConfig fields (applied) and the rest (returned, for Megatron)."""
    tnl = get_preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    own = {k: overrides.pop(k) for k in list(overrides) if k in _TNL_FIELDS}
    return (tnl.replace(**own) if own else tnl), overrides


def build_model(preset_or_config: str | TNLConfig, *, vp_stage: int | None = None, **overrides) -> GPTModel:
    """The Megatron ``GPTModel`` of a TNL preset (or config) for this rank's TP/PP/CP position.

    ``overrides`` may change TNLConfig fields (``num_layers``, ``vocab_size``, ``lrpe_layers``,
    ...) and any ``TransformerConfig`` field (``params_dtype``, ``sequence_parallel``,
    ``use_cpu_initialization``, ...). Parallel sizes come from ``megatron.core.parallel_state``,
    which must be initialised. Embedding and output weights are tied, as in the HF checkpoints.

    With a virtual pipeline (``initialize_model_parallel(virtual_pipeline_model_parallel_size=V)``) this is
    the rank's model chunk ``vp_stage`` (0..V-1): its global layers, the embedding only on the first chunk of
    the first stage and the output layer only on the last chunk of the last stage.
    """
    tnl, megatron_overrides = resolve_config(preset_or_config, **overrides)
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("initialise megatron.core.parallel_state (initialize_model_parallel) before build_model")
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    fields = dict(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=pp_size,
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
    )
    vpp_size = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp_size is not None and vp_stage is None:
        raise ValueError(f"virtual pipeline of size {vpp_size}: build_model needs vp_stage (0..{vpp_size - 1})")
    if vpp_size is not None:
        fields["virtual_pipeline_model_parallel_size"] = vpp_size
    fields.update(megatron_overrides)
    if pp_size > 1:
        fields.setdefault("pipeline_dtype", fields.get("params_dtype", torch.float32))
    config = tnl.to_transformer_config(**fields)
    block = hybrid_block_spec(  # pure TNL when the config has no softmax layers
        config,
        vp_stage,
        softmax_layers=tnl.softmax_layers,
        lrpe_layers=tnl.lrpe_layers,
        embedding_scale=tnl.embedding_scale,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=tnl.vocab_size,
        max_sequence_length=tnl.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        share_embeddings_and_output_weights=True,
        position_embedding_type="none",
        vp_stage=vp_stage,
    )
