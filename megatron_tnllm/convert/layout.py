"""Tensor names, shapes and layouts of the Hugging Face and Megatron formats, and the config translation.

A checkpoint is converted group by group: group 0 is the embedding, group i + 1 is decoder layer i. Inside the
converter a group is a dict of Hugging Face names (the OpenNLPLab layout, docs/model.md §4) to tensors; this module
maps it to and from Megatron's torch_dist keys (global tensors, TP-invariant) and Megatron's per-rank layout
(legacy ``torch`` format). Megatron keys of layer i (``hetereogenous_dist_checkpoint`` gives per-layer keys):

    decoder.layers.{i}.self_attention.qkvu_proj.weight.{query,key,value,gate}  [D, D] each = HF qkvu row blocks
    decoder.layers.{i}.self_attention.lrpe_theta                             [H, 1, dh] = HF lrpe.theta
    decoder.layers.{i}.self_attention.out_proj.weight                        [D, D]
    decoder.layers.{i}.mlp.linear_fc1.weight                                 [2G, D] = [l1; l2]
    decoder.layers.{i}.mlp.linear_fc2.weight                                 [D, G] = l3
    embedding.word_embeddings.weight                                         [V_padded, D] (output layer tied)

On the softmax-attention layers of a hybrid (``TNLConfig.softmax_layers``, HF ``softmax_attention_layers``) the
token mixer is HF ``token_mixer.qkv_proj`` [3D, D] = [q; k; v] (heads in order inside each block) and
``token_mixer.out_proj``; Megatron's :class:`~megatron_tnllm.layers.softmax_attention.SoftmaxAttention` saves

    decoder.layers.{i}.self_attention.qkv_proj.weight.{query,key,value}      [D, D] each = HF qkv row blocks
    decoder.layers.{i}.self_attention.out_proj.weight                        [D, D]

Per rank (legacy format) both fused projections hold their sections rank by rank: qkvu [q_r; k_r; v_r; u_r],
qkv [q_r; k_r; v_r] (rank r's heads of each section), so merging takes each section's rank blocks in order.
"""

from __future__ import annotations

import torch

from megatron_tnllm.configs import TNLConfig
from megatron_tnllm.convert.errors import ConversionError
from megatron_tnllm.hf.configuration_transnormer import TransnormerConfig, check_config
from megatron_tnllm.hf.modeling_transnormer import check_hybrid_config, softmax_layers
from megatron_tnllm.spec_table import spec_for

HF_EMBEDDING = "model.embed_tokens.weight"
MEGATRON_EMBEDDING = "embedding.word_embeddings.weight"
QKVU_SECTIONS = ("query", "key", "value", "gate")
QKV_SECTIONS = ("query", "key", "value")
# The sections of each fused token-mixer projection, by its name in Megatron (HF: token_mixer.NAME.weight).
FUSED_SECTIONS = {"qkvu_proj": QKVU_SECTIONS, "qkv_proj": QKV_SECTIONS}
# Megatron's linear layers each save an (empty) `_extra_state` object that its loader asks for.
MEGATRON_LINEARS = ("self_attention.out_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def tnl_from_hf_config(config: TransnormerConfig, seq_length: int = 2048) -> TNLConfig:
    """The TNLConfig of an HF config (ConversionError if the config is not a TNL the model code defines)."""
    softmax = softmax_layers(config)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in softmax) or len(set(softmax)) < len(softmax):
        raise ConversionError(
            f"config softmax_attention_layers={config.softmax_attention_layers!r}; expected a list of distinct "
            "0-based layer indices"
        )
    try:
        check_config(config)
        check_hybrid_config(config)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    glu = config.decoder_embed_dim if config.glu_dim == -1 else config.glu_dim
    tnl = TNLConfig(
        name="custom",
        num_layers=config.decoder_layers,
        hidden_size=config.decoder_embed_dim,
        num_heads=config.decoder_attention_heads,
        glu_size=glu,
        vocab_size=config.vocab_size,
        scale_embedding=not config.no_scale_embedding,
        lrpe_layers=tuple(i for i, flag in enumerate(config.linear_use_lrpe_list) if flag),
        softmax_layers=tuple(sorted(softmax)),
        seq_length=seq_length,
    )
    preset = matching_preset(tnl)
    return tnl.replace(name=preset.name) if preset else tnl


def hf_config_from_tnl(tnl: TNLConfig, **token_ids) -> TransnormerConfig:
    """The HF config of a TNLConfig; ``token_ids`` may set pad/bos/eos_token_id (default 0, 1, 2). A hybrid's config
    names its softmax layers (``softmax_attention_layers``); a TNL's has no such key, like the released ones."""
    hybrid = {"softmax_attention_layers": list(tnl.softmax_layers)} if tnl.softmax_layers else {}
    return TransnormerConfig(
        vocab_size=tnl.vocab_size,
        decoder_embed_dim=tnl.hidden_size,
        hidden_dim=tnl.hidden_size,
        decoder_layers=tnl.num_layers,
        decoder_attention_heads=tnl.num_heads,
        glu_dim=tnl.glu_size,
        no_scale_embedding=not tnl.scale_embedding,
        linear_use_lrpe_list=[int(i in tnl.lrpe_layers) for i in range(tnl.num_layers)],
        linear_act_fun="swish",
        **hybrid,
        **token_ids,
    )


def matching_preset(tnl: TNLConfig) -> TNLConfig | None:
    """The preset with this shape, LRPE layers, softmax layers and embedding scale (any vocabulary), if any."""
    spec = spec_for(tnl)
    return None if spec is None else spec.preset


def hf_group_shapes(tnl: TNLConfig, group: int) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of group ``group`` (0: embedding; i + 1: layer i)."""
    D, G, H = tnl.hidden_size, tnl.glu_size, tnl.num_heads
    if group == 0:
        return {HF_EMBEDDING: (tnl.vocab_size, D)}
    i = group - 1
    p = f"model.layers.{i}."
    fused = _fused(tnl, i)
    shapes = {f"{p}token_mixer.{fused}.weight": (len(FUSED_SECTIONS[fused]) * D, D)}
    if i in tnl.lrpe_layers:
        shapes[f"{p}token_mixer.lrpe.theta"] = (H, 1, tnl.head_dim)
    shapes[f"{p}token_mixer.out_proj.weight"] = (D, D)
    shapes.update({f"{p}channel_mixer.l1.weight": (G, D), f"{p}channel_mixer.l2.weight": (G, D)})
    shapes[f"{p}channel_mixer.l3.weight"] = (D, G)
    return shapes


def megatron_group_shapes(tnl: TNLConfig, group: int, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Megatron torch_dist keys and global shapes of group ``group``."""
    D, G, H = tnl.hidden_size, tnl.glu_size, tnl.num_heads
    if group == 0:
        return {MEGATRON_EMBEDDING: (padded_vocab, D)}
    p = f"decoder.layers.{group - 1}."
    fused = _fused(tnl, group - 1)
    shapes = {f"{p}self_attention.{fused}.weight.{s}": (D, D) for s in FUSED_SECTIONS[fused]}
    if group - 1 in tnl.lrpe_layers:
        shapes[f"{p}self_attention.lrpe_theta"] = (H, 1, tnl.head_dim)
    shapes[f"{p}self_attention.out_proj.weight"] = (D, D)
    shapes[f"{p}mlp.linear_fc1.weight"] = (2 * G, D)
    shapes[f"{p}mlp.linear_fc2.weight"] = (D, G)
    return shapes


def megatron_group_objects(tnl: TNLConfig, group: int) -> list[str]:
    """Keys of the ShardedObjects (empty ``_extra_state``) Megatron saves with group ``group``."""
    if group == 0:
        return []
    linears = (f"self_attention.{_fused(tnl, group - 1)}", *MEGATRON_LINEARS)
    return [f"decoder.layers.{group - 1}.{linear}._extra_state/shard_0_1" for linear in linears]


def _fused(tnl: TNLConfig, layer: int) -> str:
    """The fused input projection of layer ``layer``'s token mixer: qkv_proj on softmax layers, else qkvu_proj."""
    return "qkv_proj" if layer in tnl.softmax_layers else "qkvu_proj"


def _fused_of(name: str, module: str) -> str | None:
    """ "qkvu_proj" / "qkv_proj" when ``name`` ends with ``{module}.{that}.weight`` (HF module: token_mixer,
    Megatron: self_attention), else None."""
    return next((fused for fused in FUSED_SECTIONS if name.endswith(f"{module}.{fused}.weight")), None)


# HF -> Megatron names (within a layer) of the tensors that are not fused.
_RENAMED = {
    "token_mixer.lrpe.theta": "self_attention.lrpe_theta",
    "token_mixer.out_proj.weight": "self_attention.out_proj.weight",
    "channel_mixer.l3.weight": "mlp.linear_fc2.weight",
}


def hf_tensor_sets(tnl: TNLConfig, group: int) -> list[list[str]]:
    """HF names of group ``group`` in the sets that convert on their own, in file order: l1 and l2 (fused into
    fc1) together, every other tensor alone. Converting set by set bounds memory by one fused tensor."""
    names = list(hf_group_shapes(tnl, group))
    return [[n, names[k + 1]] if n.endswith("l1.weight") else [n] for k, n in enumerate(names) if "l2." not in n]


def to_megatron(group: int, tensors: dict[str, torch.Tensor], padded_vocab: int) -> dict[str, torch.Tensor]:
    """HF tensors of a group, or of some of its :func:`hf_tensor_sets` -> Megatron torch_dist tensors (embedding
    rows zero-padded to ``padded_vocab``). The qkvu / qkv sections are views (DCP saves each section's own bytes)."""
    if group == 0:
        emb = tensors[HF_EMBEDDING]
        pad = emb.new_zeros(padded_vocab - emb.shape[0], emb.shape[1])
        return {MEGATRON_EMBEDDING: torch.cat([emb, pad]) if pad.numel() else emb}
    hf, mg = f"model.layers.{group - 1}.", f"decoder.layers.{group - 1}."
    out = {}
    for name, tensor in tensors.items():
        local = name.removeprefix(hf)
        if fused := _fused_of(local, "token_mixer"):
            sections = FUSED_SECTIONS[fused]
            for section, block in zip(sections, tensor.chunk(len(sections)), strict=True):
                out[f"{mg}self_attention.{fused}.weight.{section}"] = block
        elif local == "channel_mixer.l1.weight":
            out[f"{mg}mlp.linear_fc1.weight"] = torch.cat([tensor, tensors[f"{hf}channel_mixer.l2.weight"]])
        elif local != "channel_mixer.l2.weight":
            out[mg + _RENAMED[local]] = tensor
    return out


def megatron_keys(group: int, hf_names: list[str]) -> list[str]:
    """The torch_dist keys that HF tensors ``hf_names`` of group ``group`` are made of."""
    if group == 0:
        return [MEGATRON_EMBEDDING]
    hf, mg = f"model.layers.{group - 1}.", f"decoder.layers.{group - 1}."
    keys = []
    for name in hf_names:
        local = name.removeprefix(hf)
        if fused := _fused_of(local, "token_mixer"):
            keys += [f"{mg}self_attention.{fused}.weight.{s}" for s in FUSED_SECTIONS[fused]]
        elif local in ("channel_mixer.l1.weight", "channel_mixer.l2.weight"):
            keys += [] if f"{mg}mlp.linear_fc1.weight" in keys else [f"{mg}mlp.linear_fc1.weight"]
        else:
            keys.append(mg + _RENAMED[local])
    return keys


def from_megatron(
    group: int, tensors: dict[str, torch.Tensor], vocab_size: int
) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Megatron torch_dist tensors of a group (or of some HF tensors' :func:`megatron_keys`) -> HF tensors (embedding
    padding rows dropped). The HF qkvu (qkv) is the list of its four (three) sections, in order
    (``SafetensorsWriter.write`` writes them in sequence); l1 and l2 are views of fc1."""
    if group == 0:
        return {HF_EMBEDDING: tensors[MEGATRON_EMBEDDING][:vocab_size]}
    hf, mg = f"model.layers.{group - 1}.", f"decoder.layers.{group - 1}."
    out: dict[str, torch.Tensor | list[torch.Tensor]] = {}
    for key, tensor in tensors.items():
        local = key.removeprefix(mg)
        if fused := _fused_of(local.rsplit(".", 1)[0], "self_attention"):  # a section: ...weight.{query,...}
            if local.endswith(".query"):
                sections = FUSED_SECTIONS[fused]
                out[f"{hf}token_mixer.{fused}.weight"] = [tensors[f"{key[:-6]}.{s}"] for s in sections]
        elif local == "mlp.linear_fc1.weight":
            out[f"{hf}channel_mixer.l1.weight"], out[f"{hf}channel_mixer.l2.weight"] = tensor.chunk(2)
        else:
            out[hf + next(h for h, m in _RENAMED.items() if m == local)] = tensor
    return out


def merge_tensor_parallel(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Megatron per-rank tensors (legacy ``torch`` format, local names) -> the global tensor of torch_dist.

    Column-parallel fused weights hold per-rank sections: qkvu is [q_r; k_r; v_r; u_r], qkv (softmax layers)
    [q_r; k_r; v_r], fc1 is [l1_r; l2_r].
    """
    fused = _fused_of(name, "self_attention")
    if fused or name.endswith("linear_fc1.weight"):
        sections = len(FUSED_SECTIONS[fused]) if fused else 2
        per_rank = [s.view(sections, -1, s.shape[-1]) for s in shards]
        return torch.cat(per_rank, dim=1).reshape(-1, shards[0].shape[-1])
    if name.endswith("out_proj.weight") or name.endswith("linear_fc2.weight"):
        return torch.cat(shards, dim=1)
    if name.endswith("lrpe_theta") or name.endswith("word_embeddings.weight"):
        return torch.cat(shards, dim=0)
    raise ConversionError(f"unexpected tensor {name!r} in a Megatron TNL checkpoint")


def split_torch_dist(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A merged legacy tensor under its local name -> its torch_dist key(s) (qkvu / qkv become their sections)."""
    if fused := _fused_of(key, "self_attention"):
        sections = FUSED_SECTIONS[fused]
        return {f"{key}.{s}": t for s, t in zip(sections, tensor.chunk(len(sections)), strict=True)}
    return {key: tensor}
