"""Configuration of TransNormerLLM in the layout of the released OpenNLPLab checkpoints (docs/model.md §4).

Self-contained (imports only transformers): exported Hugging Face directories carry this file as is.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class TransnormerConfig(PretrainedConfig):
    """The ``config.json`` keys of ``OpenNLPLab/TransNormerLLM-*``, with the same meanings and defaults.

    Args:
        vocab_size: V, rows of the (tied) embedding.
        decoder_embed_dim: D, the model width.
        hidden_dim: width of the token mixer's q, k, v, u; must equal D (the head dim is D / heads).
        decoder_layers: L.
        decoder_attention_heads: H.
        glu_dim: G, the SGLU width (-1 means D).
        no_scale_embedding: true: embeddings enter unscaled; false: they are multiplied by sqrt(D).
        linear_use_lrpe_list: one 0/1 per layer, 1 where q and k get LRPE (released models: layer 0).
        linear_act_fun: activation of q and k ("swish" / "silu").
        norm_type: "simplermsnorm" (weightless RMS norm, eps 1e-6).
        bias: linear biases (false in every released model).
        add_bos_token: whether the tokenizer prepends BOS (false).
        init_std: std of the normal init of linear and embedding weights.
    """

    model_type = "transnormer"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        vocab_size: int = 64000,
        use_cache: bool = True,
        init_std: float = 0.02,
        decoder_embed_dim: int = 1024,
        decoder_layers: int = 24,
        decoder_attention_heads: int = 8,
        no_scale_embedding: bool = False,
        add_bos_token: bool = False,
        norm_type: str = "simplermsnorm",
        linear_use_lrpe_list: list[int] | None = None,
        hidden_dim: int = 1024,
        linear_act_fun: str = "silu",
        glu_dim: int = 2816,
        bias: bool = False,
        tie_word_embeddings: bool = True,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.use_cache = use_cache
        self.init_std = init_std
        self.decoder_embed_dim = decoder_embed_dim
        self.decoder_layers = decoder_layers
        self.decoder_attention_heads = decoder_attention_heads
        self.no_scale_embedding = no_scale_embedding
        self.add_bos_token = add_bos_token
        self.norm_type = norm_type
        self.linear_use_lrpe_list = list(linear_use_lrpe_list or [])
        self.hidden_dim = hidden_dim
        self.linear_act_fun = linear_act_fun
        self.glu_dim = glu_dim
        self.bias = bias
        # Set before the base __init__: transformers 5 has no default for it and ties only when it is true.
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


def check_config(config: TransnormerConfig) -> None:
    """Rejects configs the released architecture does not define, naming the key and what is expected."""
    expected = {
        "hidden_dim": (config.hidden_dim, config.decoder_embed_dim, "decoder_embed_dim"),
        "norm_type": (config.norm_type, "simplermsnorm", None),
        "bias": (config.bias, False, None),
    }
    for key, (value, want, named) in expected.items():
        if value != want:
            raise ValueError(f"config {key}={value!r} is not supported; expected {named or repr(want)}")
    if config.linear_act_fun not in ("swish", "silu"):
        raise ValueError(f"config linear_act_fun={config.linear_act_fun!r} is not supported; expected 'swish'")
    if config.decoder_embed_dim % config.decoder_attention_heads:
        raise ValueError(
            f"config decoder_embed_dim={config.decoder_embed_dim} is not divisible by "
            f"decoder_attention_heads={config.decoder_attention_heads}"
        )
    lrpe = config.linear_use_lrpe_list
    if lrpe and len(lrpe) != config.decoder_layers:
        raise ValueError(
            f"config linear_use_lrpe_list has {len(lrpe)} entries; expected one per layer ({config.decoder_layers})"
        )
