"""TNL's token mixer (gated linear attention) as a Megatron-Core ``self_attention`` module.

Per layer (docs/model.md §1), on TP-local heads:
    [q|k|v|u] = x W_qkvu            column-parallel by head; this rank holds [q_r; k_r; v_r; u_r]
    q, k = SiLU(q), SiLU(k)         fused with the split (ops.qkvu); LRPE on the preset's LRPE layers
                                    (q, k head dim doubles), fused with it too at CP = 1
    o = lightning_attention(q, k, v, slope of this layer's heads)
    o = SRMSNorm(o over all D channels, across TP ranks) * u
    out = o W_out                   row-parallel (all-reduce, or reduce-scatter under SP)

Context parallelism (CP) follows Megatron's GatedDeltaNet: the rank holds a zig-zag share of the sequence;
an all-to-all trades it for the whole sequence, in natural order, of 1/CP of its heads (so the decay, LRPE
positions and kernel need no rank arithmetic), and a second one trades the attention output back. The gate
u and the norm stay in the sequence-sharded layout, where the norm only spans TP. Because the all-to-all
regroups q, k, v by head before SiLU and LRPE, CP > 1 runs them unfused (F.silu, ops.lrpe.apply_lrpe) after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.inference.contexts import BaseInferenceContext
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.ssm.gated_delta_net import get_parameter_local_cp, tensor_a2a_cp2hp, tensor_a2a_hp2cp
from megatron.core.ssm.utils import _split_tensor_factory
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from megatron_tnllm.layers.head_parallel import HeadParallelMixer
from megatron_tnllm.layers.norms import rstd_across_tp
from megatron_tnllm.ops import lightning_attention, norm_gate_rstd, srmsnorm_gate
from megatron_tnllm.ops.decay import layer_slopes
from megatron_tnllm.ops.lrpe import apply_lrpe, lrpe_theta_init
from megatron_tnllm.ops.qkvu import qkvu_silu

QKVU_SECTIONS = ("query", "key", "value", "gate")


@dataclass
class TokenMixerSubmodules:
    """The two parallel linears of the mixer (local Megatron layers by default)."""

    qkvu_proj: ModuleSpec | type = ColumnParallelLinear
    out_proj: ModuleSpec | type = RowParallelLinear


class TokenMixer(HeadParallelMixer):
    """TNL gated linear attention; plugs into ``TransformerLayerSubmodules.self_attention``.

    Args:
        config: the model's TransformerConfig (heads, kv_channels, num_layers, layernorm_epsilon).
        submodules: the qkvu and output projections.
        layer_number: 1-based global layer number (Megatron adds the pipeline offset); it selects
            this layer's decay and whether it uses LRPE.
        pg_collection: process groups (TP and CP are used); defaults to parallel_state's.
        lrpe_layers: 0-based global indices of the layers with LRPE.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: TokenMixerSubmodules,
        layer_number: int,
        pg_collection: ProcessGroupCollection | None = None,
        lrpe_layers: tuple[int, ...] = (0,),
        name: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(config, pg_collection)
        heads = config.num_attention_heads
        if self.width != config.hidden_size:
            raise ValueError(
                f"TNL needs heads * kv_channels == hidden_size; got {heads} * {self.head_dim} != {config.hidden_size}"
            )
        self.layer_index = layer_number - 1
        first_head = self.tp_group.rank() * self.heads_local
        tp_slopes = layer_slopes(heads, self.layer_index, config.num_layers)[first_head : first_head + self.heads_local]
        # [heads_attn] fp32, kept out of the module's buffers so that bf16 conversion never rounds the decay.
        self.slopes = get_parameter_local_cp(torch.tensor(tp_slopes, dtype=torch.float32), 0, self.cp_group)
        self.eps = config.layernorm_epsilon
        self.qkvu_proj, self.out_proj = self._build_projections(
            submodules.qkvu_proj, submodules.out_proj, len(QKVU_SECTIONS), "qkvu_proj", name
        )
        self.use_lrpe = self.layer_index in lrpe_layers
        if self.use_lrpe:
            theta = lrpe_theta_init(heads, self.head_dim, first_head, self.heads_local)
            device = None if config.use_cpu_initialization else torch.cuda.current_device()
            self.lrpe_theta = torch.nn.Parameter(theta.to(device=device, dtype=config.params_dtype))
            self.lrpe_theta.tensor_model_parallel = True
            self.lrpe_theta.partition_dim = 0
            self.lrpe_theta.partition_stride = 1

    def _slope(self, device: torch.device) -> torch.Tensor:
        if self.slopes.device != device:
            self.slopes = self.slopes.to(device)
        return self.slopes

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        inference_context: BaseInferenceContext | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [s, b, D] ([s/tp, b, D] under sequence parallelism) -> ([s(/tp), b, D], None).

        The attention mask is ignored (the mixer is causal by construction); packed THD batches
        reset the state at each ``packed_seq_params.cu_seqlens_q`` boundary.
        """
        cu_seqlens = self._packed_cu_seqlens(inference_context, packed_seq_params)
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(torch.int64)
        qkvu, _ = self.qkvu_proj(hidden_states)  # [s, b, 4 * D / tp] (s: this CP rank's tokens)
        b = qkvu.shape[1]
        local = self.heads_local * self.head_dim
        if self.cp_group.size() == 1:
            # one pass for both SiLUs (and LRPE), one for the whole qkvu gradient (v, u: views of qkvu)
            lrpe = {}
            if self.use_lrpe:  # this rank's heads' theta [h, 1, d]; positions [s]
                lrpe = {"theta": self.lrpe_theta, "positions": self._positions(qkvu.shape[0], cu_seqlens, qkvu.device)}
            q, k, v, u = qkvu_silu(qkvu, self.heads_attn, self.head_dim, **lrpe)  # [s, b, h, d or 2d] x 3, [s, b, D/tp]
        else:  # the all-to-all regroups q, k, v by head first, so SiLU and LRPE run after it, unfused
            qkv = tensor_a2a_cp2hp(qkvu[..., : 3 * local], 0, -1, self.cp_group, split_sections=[local] * 3)
            q, k, v = qkv.view(qkv.shape[0], b, 3, self.heads_attn, self.head_dim).unbind(2)  # views
            q, k = F.silu(q), F.silu(k)
            u = qkvu[..., 3 * local :]
            if self.use_lrpe:
                positions = self._positions(q.shape[0], cu_seqlens, q.device)[:, None]  # [seq, 1]
                theta = get_parameter_local_cp(self.lrpe_theta, 0, self.cp_group)  # [heads_attn, 1, d]
                q = apply_lrpe(q, theta, positions)
                k = apply_lrpe(k, theta, positions)
        seq = q.shape[0]  # the whole sequence under CP
        o, _ = lightning_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), self._slope(q.device), cu_seqlens=cu_seqlens
        )  # [b, seq, h, d]
        o = tensor_a2a_hp2cp(o.transpose(0, 1).reshape(seq, b, -1), 0, -1, self.cp_group)  # [s, b, D / tp]
        if self.tp_group.size() == 1:
            o = srmsnorm_gate(o, u, self.eps)
        else:  # the norm spans all heads, i.e. all TP ranks
            o = norm_gate_rstd(o, u, rstd_across_tp(o, self.width, self.eps, self.tp_group))
        return self.out_proj(o)

    @staticmethod
    def _positions(s: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Token positions [s]; they restart at each packed sequence."""
        positions = torch.arange(s, device=device)
        if cu_seqlens is not None:
            starts = cu_seqlens[:-1].to(device)
            positions = positions - torch.repeat_interleave(starts, cu_seqlens.diff().to(device), output_size=s)
        return positions

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """TP-invariant checkpoint keys: theta is split by head; qkvu is saved as four tensors
        ``qkvu_proj.weight.{query,key,value,gate}``, each [D, D] globally (the HF row blocks)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state: dict = {}
        self._save_to_state_dict(state, "", keep_vars=True)
        state = make_sharded_tensors_for_checkpoint(
            state,
            prefix,
            tensor_parallel_layers_axis_map={"lrpe_theta": 0},
            sharded_offsets=sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
        for child_name, module in self.named_children():
            state.update(
                sharded_state_dict_default(
                    module, f"{prefix}{child_name}.", sharded_offsets, metadata, tp_group=self.tp_group
                )
            )
        key = f"{prefix}qkvu_proj.weight"
        local = self.heads_local * self.head_dim
        state[key] = _split_tensor_factory(state[key], [local] * 4, list(QKVU_SECTIONS), 0)
        return state
