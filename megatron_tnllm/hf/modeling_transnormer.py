"""TransNormerLLM for Hugging Face transformers, in the layout of the released OpenNLPLab checkpoints.

Same module and parameter names as ``OpenNLPLab/TransNormerLLM-*`` (docs/model.md §4), so their weights load as
they are; same computation (docs/model.md §1), with two deliberate differences: LRPE angles are formed in fp32
(the released code rounds positions to bf16), and padding is handled per sequence (left-padded batches
generate what each prompt generates alone).

Generation keeps a :class:`TransnormerCache`: per layer one fp32 state [b, h, d_qk, d_v], so memory does
not grow with the length. Beam search reorders it by beam, in place (the released ``_reorder_cache`` iterates
over the wrong dimension).

Hybrid models (config key ``softmax_attention_layers``: 0-based layer indices, absent or empty for TNL) use
causal softmax attention without position encoding on those layers (:class:`SoftmaxAttention`, weights
``token_mixer.qkv_proj`` [3D, D] and ``token_mixer.out_proj`` [D, D]); the cache keeps their keys and values,
which grow with the length, beside the constant-size states of the other layers.

Decoding one token per sequence can run on static buffers (:class:`DecodeGraph`, one per batch size, made on
first use) and, on CUDA, as one captured CUDA graph: eager PyTorch spends most of a decode step launching
kernels. ``TransnormerForCausalLM.decode_mode`` selects it ("auto": a CUDA graph on CUDA, eager elsewhere).

The operators come from ``megatron_tnllm`` (Triton kernels on CUDA tensors, PyTorch elsewhere). Exported
checkpoint directories carry a copy of this file in which the marked import block below is replaced by the
PyTorch reference code (``megatron_tnllm.hf.export.standalone_modeling_source``), so they load with only
torch and transformers installed.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

# --- standalone imports: begin ---
from megatron_tnllm.ops import (
    lightning_attention,
    lightning_attention_step,
    skinny_glu,
    skinny_linear,
    srmsnorm,
    srmsnorm_gate,
)
from megatron_tnllm.ops.decay import layer_slopes
from megatron_tnllm.ops.lrpe import apply_lrpe, lrpe_theta_init

# --- standalone imports: end ---
from .configuration_transnormer import TransnormerConfig, check_config

__all__ = [
    "DecodeGraph",
    "SoftmaxAttention",
    "TransnormerCache",
    "TransnormerConfig",
    "TransnormerForCausalLM",
    "TransnormerModel",
    "TransnormerPreTrainedModel",
]

NORM_EPS = 1e-6
# Products of at most this many rows without autograd (a decode step's batch) run the skinny kernels: one pass over
# the weight with the residual add or SGLU's gate in the epilogue. Larger ones (prefill, training) run nn.Linear:
# at 64 rows cuBLAS was faster on 3 of tnl-7b's 5 products (docs/decoding.md).
SKINNY_ROWS = 16
# transformers renamed the cache field of model outputs (and the generate() keyword) from
# "past_key_values" to "cache" during 5.x; speak whichever this version speaks.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def check_hybrid_config(config: TransnormerConfig) -> None:
    """Rejects softmax-attention layers outside the model or on LRPE layers."""
    lrpe = config.linear_use_lrpe_list
    softmax = softmax_layers(config)
    bad = [i for i in softmax if not 0 <= i < config.decoder_layers]
    if bad:
        raise ValueError(f"config softmax_attention_layers {bad} outside 0..{config.decoder_layers - 1}")
    both = [i for i in softmax if lrpe and lrpe[i]]
    if both:
        raise ValueError(
            f"config softmax_attention_layers {both} also use LRPE; expected 0 there in linear_use_lrpe_list"
        )


def softmax_layers(config: TransnormerConfig) -> list[int]:
    """The 0-based indices of the softmax-attention layers (none in TNL checkpoints, which lack the key)."""
    return list(getattr(config, "softmax_attention_layers", None) or [])


class TransnormerCache:
    """Generation state: constant-size for TNL layers, keys and values for softmax-attention layers.

    Attributes:
        states: per TNL layer the fp32 state [b, h, d_qk, d_v] (d_qk = 2 d on LRPE layers) after the last token;
            None on softmax layers.
        keys, values: per softmax layer [b, h, seen_tokens, d] (activation dtype); None on TNL layers.
        key_mask: [b, seen_tokens] bool, False at padding, for the softmax layers; None while there is none.
        positions: [b] int64, the LRPE position of each sequence's next token (its count of non-pad tokens).
        seen_tokens: tokens consumed so far, pad included (what generate() calls the cache length).
    """

    def __init__(self, num_layers: int) -> None:
        self.states: list[torch.Tensor | None] = [None] * num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i continues the sequence in row ``beam_idx[i]`` (every state and position).

        In place, so that states living in a :class:`DecodeGraph`'s static buffers stay there.
        """
        for t in [*self.states, *self.keys, *self.values, self.key_mask, self.positions]:
            if t is not None:
                t.copy_(t.index_select(0, beam_idx.to(t.device)))


class DecodeGraph:
    """One decode step (a token per sequence) at a fixed batch size b, on static buffers.

    Buffers: ids [b, 1] int64, mask [b, 1] bool (False for a pad token), positions [b] int64 (each row's next
    LRPE position), one fp32 state [b, h, d_qk, d_v] per layer, logits [b, 1, V]. ``step`` reads them and
    updates the states and positions in place. With ``capture`` (CUDA) the step is recorded once as a CUDA graph
    and replayed; otherwise it runs eagerly on the same buffers (the CPU path, and the check of the graph path).

    A cache is bound by copying its state in and pointing its tensors at the buffers; the cache bound before it
    first gets a private copy back, so two caches never share state.
    """

    def __init__(self, cache: TransnormerCache, step, capture: bool) -> None:
        """cache: the template (its state shapes, dtype and device); step: fn(DecodeGraph) -> logits [b, 1, V]."""
        self.states = [torch.zeros_like(s) for s in cache.states]
        device = self.states[0].device
        b = self.states[0].shape[0]
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.mask = torch.ones(b, 1, dtype=torch.bool, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self._owner: weakref.ref | None = None
        if capture:
            # Warm-up off the capturing stream (Triton compiles, cuBLAS picks its kernels), then record. Both run
            # on the zeroed buffers, before any cache is bound.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    step(self)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = step(self)

    @staticmethod
    def key(cache: TransnormerCache) -> tuple:
        """What a graph is specific to: the device, batch size and every state's shape and dtype."""
        return (cache.states[0].device, *((tuple(s.shape), s.dtype) for s in cache.states))

    def bind(self, cache: TransnormerCache) -> None:
        """Moves ``cache``'s states and positions into the buffers (a no-op when they are there already)."""
        if cache.positions is self.positions and all(s is t for s, t in zip(cache.states, self.states, strict=True)):
            return
        owner = self._owner() if self._owner is not None else None
        if owner is not None and owner is not cache:
            owner.states = [s.clone() if s is t else s for s, t in zip(owner.states, self.states, strict=True)]
            if owner.positions is self.positions:
                owner.positions = self.positions.clone()
        for s, t in zip(cache.states, self.states, strict=True):
            if s is not t:
                t.copy_(s)
        if cache.positions is not self.positions:
            self.positions.copy_(cache.positions)
        cache.states, cache.positions = list(self.states), self.positions
        self._owner = weakref.ref(cache)

    def run(self, cache: TransnormerCache, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids [b, 1], mask [b, 1] (nonzero for real tokens) -> logits [b, 1, V] (a fresh tensor); advances
        ``cache`` by one token."""
        self.bind(cache)
        self.ids.copy_(ids)
        self.mask.copy_(mask)
        cache.seen_tokens += 1
        if self.graph is None:
            return self.step(self)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites the buffer


class Lrpe(nn.Module):
    """LRPE's learnable angles theta [h, 1, d] (released name ``lrpe.theta``)."""

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.theta = nn.Parameter(torch.empty(num_heads, 1, head_dim))  # set by _init_weights or the checkpoint

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [b, n, h, d] at positions [b, n] -> [b, n, h, 2d]."""
        return apply_lrpe(x, self.theta, positions)


def _skinny(x: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() and x.numel() <= SKINNY_ROWS * x.shape[-1]


def project(x: torch.Tensor, linear: nn.Linear, residual: torch.Tensor | None = None) -> torch.Tensor:
    """linear(x) for x [..., K], plus ``residual`` [..., N] when given (``linear`` has no bias)."""
    if _skinny(x):
        return skinny_linear(x, linear.weight, residual)
    y = linear(x)
    return y if residual is None else residual + y


class NormLinearAttention(nn.Module):
    """The token mixer: o = SRMSNorm(decayed linear attention(SiLU(q), SiLU(k), v)) * u, projected."""

    def __init__(self, config: TransnormerConfig, layer_idx: int) -> None:
        super().__init__()
        width = config.decoder_embed_dim
        self.num_heads = config.decoder_attention_heads
        self.head_dim = width // self.num_heads
        self.qkvu_proj = nn.Linear(width, 4 * width, bias=False)
        self.out_proj = nn.Linear(width, width, bias=False)
        lrpe = config.linear_use_lrpe_list
        if lrpe and lrpe[layer_idx]:
            self.lrpe = Lrpe(self.num_heads, self.head_dim)
        self.slopes = layer_slopes(self.num_heads, layer_idx, config.decoder_layers)
        self._slope: torch.Tensor | None = None

    def slope(self, device: torch.device) -> torch.Tensor:
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the decay.
        if self._slope is None or self._slope.device != device:
            self._slope = torch.tensor(self.slopes, dtype=torch.float32, device=device)
        return self._slope

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        pad_mask: torch.Tensor | None,
        state: torch.Tensor | None,
        use_cache: bool,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [b, n, D] -> (residual + output [b, n, D], new state [b, h, d_qk, d_v] fp32 or None).

        positions [b, n]: LRPE positions; pad_mask [b, n] bool, False at padding (whose v rows are zeroed,
        so padding adds nothing to the state); state: the state before these tokens; residual [b, n, D] or None.
        """
        b, n, width = x.shape
        qkvu = project(x, self.qkvu_proj).view(b, n, 4, self.num_heads, self.head_dim)
        u = qkvu[:, :, 3].reshape(b, n, width)  # a view: the gate is read in place by the norm below
        slope = self.slope(x.device)
        lrpe = hasattr(self, "lrpe")
        if n == 1 and state is not None and not lrpe:
            # A decode step is a chain of small kernels: SiLU of q and k and the padding select run inside the
            # step kernel as it loads them (one launch instead of three).
            keep = None if pad_mask is None else pad_mask[:, 0]
            q, k, v = qkvu[:, 0, :3].unbind(1)  # [b, h, d] each, raw projections
            o, state = lightning_attention_step(q, k, v, slope, state, inplace=True, silu_qk=True, keep=keep)
            o = o[:, None]
        else:
            q, k = F.silu(qkvu[:, :, :2]).unbind(2)  # [b, n, h, d]; SiLU of q and k in one pass
            v = qkvu[:, :, 2]
            if lrpe:
                q, k = self.lrpe(q, positions), self.lrpe(k, positions)
            if pad_mask is not None:
                v = torch.where(pad_mask[:, :, None, None], v, 0.0)
            if n == 1 and state is not None:
                o, state = lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], slope, state, inplace=True)
                o = o[:, None]
            else:
                o, state = lightning_attention(q, k, v, slope, initial_state=state, output_final_state=use_cache)
        # the gate multiplied into the norm's output in one pass, without rounding in between
        o = srmsnorm_gate(o.reshape(b, n, width), u, NORM_EPS)
        return project(o, self.out_proj, residual), state


class SoftmaxAttention(nn.Module):
    """The token mixer of a hybrid model's softmax layers: causal multi-head softmax attention, scale 1/sqrt(d),
    no position encoding (the TNL layers carry position)."""

    def __init__(self, config: TransnormerConfig) -> None:
        super().__init__()
        width = config.decoder_embed_dim
        self.num_heads = config.decoder_attention_heads
        self.head_dim = width // self.num_heads
        self.qkv_proj = nn.Linear(width, 3 * width, bias=False)
        self.out_proj = nn.Linear(width, width, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor] | None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [b, n, D] -> (residual + output [b, n, D], (keys, values) [b, h, past + n, d]).

        key_mask [b, past + n] bool, False at padding (None: no padding); kv: the keys and values of the past
        tokens, or None; residual [b, n, D] or None.
        """
        b, n, width = x.shape
        q, k, v = project(x, self.qkv_proj).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if kv is not None:
            k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
        past = k.shape[2] - n
        if key_mask is None and (past == 0 or n == 1):  # SDPA's mask-free (flash) path
            o = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0)
        else:
            query_at = past + torch.arange(n, device=x.device)[:, None]
            key_at = torch.arange(past + n, device=x.device)
            allowed = key_at <= query_at  # [n, past + n]
            if key_mask is not None:  # a pad query keeps its own key, so that no row is empty (NaN)
                allowed = allowed & (key_mask[:, None, :] | (key_at == query_at))[:, None]  # [b, 1, n, past + n]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return project(o.transpose(1, 2).reshape(b, n, width), self.out_proj, residual), (k, v)


class GLU(nn.Module):
    """The channel mixer, SGLU: l3(l1(x) * l2(x)), no activation."""

    def __init__(self, width: int, glu_width: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(width, glu_width, bias=False)
        self.l2 = nn.Linear(width, glu_width, bias=False)
        self.l3 = nn.Linear(glu_width, width, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., D] -> residual + l3(l1(x) * l2(x)) [..., D] (no residual: the SGLU output alone)."""
        h = skinny_glu(x, self.l1.weight, self.l2.weight) if _skinny(x) else self.l1(x) * self.l2(x)
        return project(h, self.l3, residual)


class TransnormerDecoderLayer(nn.Module):
    """Pre-norm layer: x + TokenMixer(SRMSNorm(x)), then x + SGLU(SRMSNorm(x)). Norms have no weights."""

    def __init__(self, config: TransnormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.softmax = layer_idx in softmax_layers(config)
        self.token_mixer = SoftmaxAttention(config) if self.softmax else NormLinearAttention(config, layer_idx)
        glu_width = config.decoder_embed_dim if config.glu_dim == -1 else config.glu_dim
        self.channel_mixer = GLU(config.decoder_embed_dim, glu_width)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        pad_mask: torch.Tensor | None,
        state: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
        use_cache: bool,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None]:
        """x [b, n, D] -> (x [b, n, D], state). state: the TNL state, or on softmax layers the (keys, values);
        positions and pad_mask [b, n] feed TNL layers, key_mask [b, past + n] softmax layers."""
        if self.softmax:
            x, state = self.token_mixer(srmsnorm(x, NORM_EPS), key_mask, state, residual=x)
        else:
            x, state = self.token_mixer(srmsnorm(x, NORM_EPS), positions, pad_mask, state, use_cache, residual=x)
        return self.channel_mixer(srmsnorm(x, NORM_EPS), residual=x), state


class TransnormerPreTrainedModel(PreTrainedModel):
    config_class = TransnormerConfig
    base_model_prefix = "model"
    _no_split_modules = ["TransnormerDecoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"decoder\.version"]  # residue of the Metaseq conversion
    _is_stateful = True  # a state cannot be rolled back: no assisted generation

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a key/value cache: the model creates its TransnormerCache at prefill.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, Lrpe):
            module.theta.copy_(lrpe_theta_init(module.num_heads, module.head_dim))


class TransnormerModel(TransnormerPreTrainedModel):
    """Embedding, decoder layers and the final SRMSNorm."""

    def __init__(self, config: TransnormerConfig) -> None:
        check_config(config)
        check_hybrid_config(config)
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.decoder_embed_dim, config.pad_token_id)
        self.layers = nn.ModuleList(TransnormerDecoderLayer(config, i) for i in range(config.decoder_layers))
        self.softmax_layers = softmax_layers(config)
        self.embed_scale = 1.0 if config.no_scale_embedding else math.sqrt(config.decoder_embed_dim)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: TransnormerCache | None = None,
        past_key_values: TransnormerCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """input_ids [b, n] (or inputs_embeds [b, n, D], taken unscaled) -> last_hidden_state [b, n, D].

        attention_mask [b, past + n] (or [b, n]): 1 for tokens, 0 for left padding. ``cache`` (named
        ``past_key_values`` by transformers up to 5.17 at least) holds the state after the past tokens; with
        ``use_cache`` the updated cache is returned.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.embed_scale
        b, n, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if use_cache and cache is None:
            cache = TransnormerCache(len(self.layers))
        if not use_cache:
            cache = None

        pad_mask = None if attention_mask is None else attention_mask[:, -n:].to(device=device, dtype=torch.bool)
        start = torch.zeros(b, dtype=torch.long, device=device)
        if cache is not None and cache.positions is not None:
            start = cache.positions.to(device)
        if pad_mask is None:
            positions = start[:, None] + torch.arange(n, device=device)
        else:  # count real tokens only: a left-padded prompt gets the positions it has alone
            positions = start[:, None] + pad_mask.long().cumsum(-1) - 1

        key_mask = self._key_mask(cache, pad_mask, b, n)
        hidden = inputs_embeds
        all_hidden = []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(hidden)
            if layer.softmax:
                kv = (cache.keys[i], cache.values[i]) if cache is not None and cache.keys[i] is not None else None
                hidden, (keys, values) = layer(hidden, positions, pad_mask, kv, use_cache, key_mask)
                if cache is not None:
                    cache.keys[i], cache.values[i] = keys, values
                continue
            state = cache.states[i] if cache is not None else None
            hidden, state = layer(hidden, positions, pad_mask, state, use_cache)
            if cache is not None:
                cache.states[i] = state
        hidden = srmsnorm(hidden, NORM_EPS)
        if output_hidden_states:
            all_hidden.append(hidden)
        if cache is not None:
            cache.positions = start + (n if pad_mask is None else pad_mask.long().sum(-1))
            cache.seen_tokens += n
            cache.key_mask = key_mask

        out = BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            **{CACHE_FIELD: cache},
        )
        return out if return_dict is not False else out.to_tuple()

    def _key_mask(
        self, cache: TransnormerCache | None, pad_mask: torch.Tensor | None, b: int, n: int
    ) -> torch.Tensor | None:
        """The softmax layers' key mask [b, past + n] (False at padding), or None when nothing is padded."""
        past_mask = cache.key_mask if cache is not None else None
        if not self.softmax_layers or (past_mask is None and (pad_mask is None or bool(pad_mask.all()))):
            return None
        past = cache.seen_tokens if cache is not None else 0
        device = self.embed_tokens.weight.device
        if past_mask is None:
            past_mask = torch.ones(b, past, dtype=torch.bool, device=device)
        if pad_mask is None:
            pad_mask = torch.ones(b, n, dtype=torch.bool, device=device)
        return torch.cat([past_mask, pad_mask], dim=1)


DECODE_MODES = ("auto", "graph", "static", "eager")


class TransnormerForCausalLM(TransnormerPreTrainedModel, GenerationMixin):
    """TransnormerModel plus the output layer tied to the embedding.

    ``decode_mode`` picks how a one-token step on a filled cache runs (without gradients, in eval mode):
    "graph" replays a CUDA graph per batch size (CUDA only), "static" runs the same step eagerly on the same
    static buffers, "eager" runs the plain forward, "auto" (the default) is "graph" on CUDA and "eager"
    elsewhere. All four compute the same numbers.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TransnormerConfig) -> None:
        super().__init__(config)
        self.model = TransnormerModel(config)
        self.lm_head = nn.Linear(config.decoder_embed_dim, config.vocab_size, bias=False)
        self.decode_mode = "auto"
        self.decode_graphs: dict[tuple, DecodeGraph] = {}
        self.post_init()

    def _apply(self, fn, *args, **kwargs):
        # A graph holds the addresses of the weights it was recorded with; .to()/.half()/... move them.
        self.__dict__.get("decode_graphs", {}).clear()
        return super()._apply(fn, *args, **kwargs)

    def _decode_graph_for(self, cache: TransnormerCache, ids: torch.Tensor) -> DecodeGraph | None:
        """The DecodeGraph for this one-token step, or None when the step must run the plain forward."""
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode={self.decode_mode!r}; expected one of {DECODE_MODES}")
        mode = self.decode_mode
        if mode == "auto":
            mode = "graph" if ids.is_cuda else "eager"
        if self.model.softmax_layers and mode != "eager":
            if self.decode_mode == "auto":
                return None
            raise ValueError(
                f"decode_mode={mode!r} needs a pure TNL model; layers {self.model.softmax_layers} use softmax "
                "attention, whose cache grows (use 'auto' or 'eager')"
            )
        if mode == "eager" or self.training or torch.is_grad_enabled() or cache.positions is None:
            return None
        if any(s is None for s in cache.states):
            return None
        if mode == "graph" and not ids.is_cuda:
            raise ValueError(f"decode_mode='graph' needs CUDA tensors; got input_ids on {ids.device}")
        key = (mode, *DecodeGraph.key(cache))
        if key not in self.decode_graphs:
            self.decode_graphs[key] = DecodeGraph(cache, self._decode_step, capture=mode == "graph")
        return self.decode_graphs[key]

    def _decode_step(self, g: DecodeGraph) -> torch.Tensor:
        """The forward pass of one token per row on ``g``'s buffers -> logits [b, 1, V]; ``g.states`` and
        ``g.positions`` are updated in place (what ``forward`` computes for the same token, op for op)."""
        m = self.model
        hidden = m.embed_tokens(g.ids) * m.embed_scale
        positions = g.positions[:, None] + g.mask.long() - 1
        for layer, state in zip(m.layers, g.states, strict=True):
            hidden, _ = layer(hidden, positions, g.mask, state, True)  # the step updates ``state`` in place
        g.positions.add_(g.mask[:, 0].long())
        return project(srmsnorm(hidden, NORM_EPS), self.lm_head)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: TransnormerCache | None = None,
        past_key_values: TransnormerCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits [b, n, V] (the last ``logits_to_keep`` positions if > 0); with ``labels`` [b, n] also the
        next-token cross-entropy (labels shifted inside, -100 ignored)."""
        cache = cache if cache is not None else past_key_values
        graph = None
        if (
            cache is not None
            and input_ids is not None
            and input_ids.shape[1] == 1
            and labels is None
            and use_cache is not False
            and not (output_hidden_states or self.config.output_hidden_states)
        ):
            graph = self._decode_graph_for(cache, input_ids)
        if graph is not None:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask[:, -1:]
            result = CausalLMOutputWithPast(logits=graph.run(cache, input_ids, mask), **{CACHE_FIELD: cache})
            return result if return_dict is not False else result.to_tuple()
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = out.last_hidden_state
        logits = project(hidden[:, -logits_to_keep:] if logits_to_keep else hidden, self.lm_head)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_FIELD: getattr(out, CACHE_FIELD)}
        )
        return result if return_dict is not False else result.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True,
        logits_to_keep: int | None = None,
        **kwargs,
    ) -> dict:
        """Feeds only the tokens the cache has not seen (all of them without a cache).

        The attention mask spans past and new tokens, so its length minus the cache length is the number of
        new tokens whatever the transformers version passes in ``input_ids``.
        """
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        total = attention_mask.shape[1] if attention_mask is not None else input_ids.shape[1]
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache, CACHE_FIELD: cache}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, past - total :] if past else input_ids
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs
