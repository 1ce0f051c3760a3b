"""What TNL's token mixer and the hybrids' softmax attention share: heads split across tensor-parallel ranks (and,
inside the attention, across context-parallel ranks by an all-to-all), a column-parallel fused input projection of
several head-width sections and a row-parallel output projection."""

from __future__ import annotations

import torch
from megatron.core.inference.contexts import BaseInferenceContext
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module


class HeadParallelMixer(MegatronModule):
    """Base of the ``self_attention`` modules: process groups and the per-rank head counts.

    Sets ``tp_group``, ``cp_group``, ``head_dim``, ``width`` (heads x head_dim), ``heads_local`` (this TP rank's
    heads) and ``heads_attn`` (the heads this rank attends over after the CP all-to-all).
    """

    def __init__(self, config: TransformerConfig, pg_collection: ProcessGroupCollection | None) -> None:
        super().__init__(config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.tp_group, self.cp_group = pg_collection.tp, pg_collection.cp
        tp_size, cp_size = self.tp_group.size(), self.cp_group.size()
        heads = config.num_attention_heads
        if heads % (tp_size * cp_size):
            raise ValueError(
                f"num_attention_heads {heads} is not divisible by tensor x context parallel {tp_size} x {cp_size}"
            )
        self.head_dim = config.kv_channels or config.hidden_size // heads
        self.width = heads * self.head_dim
        self.heads_local = heads // tp_size
        self.heads_attn = self.heads_local // cp_size

    def _build_projections(
        self, in_spec: ModuleSpec | type, out_spec: ModuleSpec | type, sections: int, in_name: str, name: str | None
    ) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(input projection D -> sections x width, column-parallel by head; output projection width -> D,
        row-parallel), bias-free, built in that order (which fixes their random initialisation)."""
        config = self.config
        in_proj = build_module(
            in_spec,
            config.hidden_size,
            sections * self.width,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.tp_group,
            name=f"{name}.{in_name}" if name else None,
        )
        out_proj = build_module(
            out_spec,
            self.width,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=self.tp_group,
            name=f"{name}.out_proj" if name else None,
        )
        return in_proj, out_proj

    def _packed_cu_seqlens(
        self, inference_context: BaseInferenceContext | None, packed_seq_params: PackedSeqParams | None
    ) -> torch.Tensor | None:
        """The packed (THD) batch's sequence offsets cu_seqlens_q, or None; refuses Megatron inference and packed
        sequences under context parallelism."""
        if inference_context is not None:
            raise NotImplementedError("Megatron inference is not supported; generate with megatron_tnllm.hf")
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return None
        if self.cp_group.size() > 1:
            raise NotImplementedError("packed (THD) sequences with context parallelism are not supported")
        return packed_seq_params.cu_seqlens_q
