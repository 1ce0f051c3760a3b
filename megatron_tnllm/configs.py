"""TransNormerLLM model presets and their translation to Megatron-Core.

``get_preset(name)`` returns a :class:`TNLConfig`; it knows its parameter count, builds the
Megatron ``TransformerConfig`` for the current parallel layout and lists the ``pretrain_gpt.py``
arguments of its shape. ``python -m megatron_tnllm.configs`` prints the table.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig

__all__ = ["HYBRID_PRESETS", "PRESETS", "TNLConfig", "get_preset", "padded_vocab_size", "softmax_every"]


@dataclass(frozen=True)
class TNLConfig:
    """Shape and fixed settings of one TransNormerLLM model (docs/model.md §1-2).

    Attributes:
        name: preset name, e.g. "tnl-1b".
        num_layers, hidden_size, num_heads: L, D, H (head dim D / H).
        glu_size: G, the SGLU width (l1, l2: D -> G; l3: G -> D).
        vocab_size: tokenizer vocabulary (64000 for the released Baichuan-7B tokenizer).
        scale_embedding: multiply token embeddings by sqrt(D) (HF ``no_scale_embedding`` false).
        lrpe_layers: 0-based indices of the layers whose q, k get LRPE (released models: layer 0).
        softmax_layers: 0-based indices of the layers that use softmax attention instead of the TNL token
            mixer (hybrid models, see :mod:`megatron_tnllm.hybrid`; empty for TNL itself).
        norm_eps: epsilon of every SRMSNorm.
        seq_length: default training sequence length for :meth:`to_megatron_args`.
        source: where the shape comes from.
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    glu_size: int
    vocab_size: int = 64000
    scale_embedding: bool = False
    lrpe_layers: tuple[int, ...] = (0,)
    softmax_layers: tuple[int, ...] = ()
    norm_eps: float = 1e-6
    seq_length: int = 2048
    source: str = ""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"{self.name}: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        bad = [i for i in self.lrpe_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"{self.name}: lrpe_layers {bad} outside 0..{self.num_layers - 1}")
        bad = [i for i in self.softmax_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"{self.name}: softmax_layers {bad} outside 0..{self.num_layers - 1}")
        both = sorted(set(self.softmax_layers) & set(self.lrpe_layers))
        if both:
            raise ValueError(
                f"{self.name}: layers {both} are in both lrpe_layers and softmax_layers; expected disjoint"
            )
        for field in ("num_layers", "hidden_size", "num_heads", "glu_size", "vocab_size", "seq_length"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{self.name}: {field} must be positive, got {getattr(self, field)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embedding_scale(self) -> float:
        return math.sqrt(self.hidden_size) if self.scale_embedding else 1.0

    @property
    def spec_name(self) -> str:
        """The NAME in ``--spec megatron_tnllm.specs NAME`` for this preset."""
        return self.name.replace("-", "_")

    def replace(self, **changes) -> TNLConfig:
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Parameters with the embedding tied to the output layer (what the HF checkpoints hold)."""
        D, G = self.hidden_size, self.glu_size
        per_layer = 4 * D * D + D * D + 3 * D * G
        softmax_saving = D * D  # a softmax layer projects to q, k, v: no gate u
        return (
            self.vocab_size * D
            + self.num_layers * per_layer
            + len(self.lrpe_layers) * D
            - len(self.softmax_layers) * softmax_saving
        )

    def to_transformer_config(self, **overrides) -> TransformerConfig:
        """The Megatron-Core ``TransformerConfig`` of this shape; ``overrides`` set any of its fields
        (parallel sizes, ``params_dtype``, ``use_cpu_initialization``, ...)."""
        from megatron.core.transformer import TransformerConfig

        fields = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_heads,
            kv_channels=self.head_dim,
            ffn_hidden_size=self.glu_size,
            layernorm_epsilon=self.norm_eps,
            normalization="RMSNorm",
            add_bias_linear=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=0.02,
            bias_dropout_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            # Layers differ (LRPE theta on some), so checkpoint keys are per layer, not stacked.
            hetereogenous_dist_checkpoint=True,
        )
        fields.update(overrides)
        return TransformerConfig(**fields)

    def to_megatron_args(self) -> list[str]:
        """``pretrain_gpt.py`` arguments for this shape (add data, parallel layout and schedule)."""
        args = {
            "--num-layers": self.num_layers,
            "--hidden-size": self.hidden_size,
            "--num-attention-heads": self.num_heads,
            "--kv-channels": self.head_dim,
            "--ffn-hidden-size": self.glu_size,
            "--norm-epsilon": self.norm_eps,
            "--normalization": "RMSNorm",
            "--position-embedding-type": "none",
            "--hidden-dropout": 0.0,
            "--attention-dropout": 0.0,
            "--init-method-std": 0.02,
            "--seq-length": self.seq_length,
            "--max-position-embeddings": self.seq_length,
            "--transformer-impl": "local",
        }
        flat = [str(x) for kv in args.items() for x in kv]
        return [
            *flat,
            "--disable-bias-linear",
            "--no-bias-dropout-fusion",
            "--no-create-attention-mask-in-dataloader",
            "--spec",
            "megatron_tnllm.specs",
            self.spec_name,
        ]


def _preset(name, L, D, H, G, scale, source, **kw) -> TNLConfig:
    return TNLConfig(name, L, D, H, G, scale_embedding=scale, source=source, **kw)


PRESETS: dict[str, TNLConfig] = {
    p.name: p
    for p in (
        _preset("tnl-tiny", 4, 256, 4, 704, True, "tests and the CPU demo", vocab_size=2048, seq_length=256),
        _preset("tnl-385m", 24, 1024, 8, 2816, True, "released (vocab and embedding scale unverified)"),
        _preset("tnl-1b", 16, 2048, 16, 5632, True, "released"),
        _preset("tnl-3b", 32, 2560, 20, 6912, False, "released (TNL2)"),
        _preset("tnl-7b", 30, 4096, 32, 11008, False, "released", seq_length=4096),
        _preset("tnl-13b", 40, 5120, 40, 12288, False, "proposed"),
        _preset("tnl-65b", 80, 8192, 64, 19200, False, "proposed"),
        _preset("tnl-175b", 96, 12288, 96, 28672, False, "proposed"),
    )
}


def softmax_every(num_layers: int, every: int) -> tuple[int, ...]:
    """The softmax layers of a hybrid: the last of every ``every`` layers, 0-based (every=8: 7, 15, ...).

    MiniMax-01's layout (one softmax layer after every seven lightning layers). Layer 0 always stays
    TNL (it holds LRPE); a tail shorter than ``every`` gets no softmax layer.
    """
    if every < 2:
        raise ValueError(f"every={every}: a hybrid needs at least one TNL layer per softmax layer (every >= 2)")
    return tuple(range(every - 1, num_layers, every))


def _hybrid(base: TNLConfig, every: int) -> TNLConfig:
    layers = softmax_every(base.num_layers, every)
    return base.replace(
        name=f"{base.name}-hybrid",
        softmax_layers=layers,
        source=f"{base.name}, softmax attention on {len(layers)} of {base.num_layers} layers (every {every})",
    )


# Same widths as the TNL presets; tnl-tiny alternates so that both stages of a 2-stage pipeline hold one.
HYBRID_PRESETS: dict[str, TNLConfig] = {
    h.name: h for h in (_hybrid(p, 2 if p.name == "tnl-tiny" else 8) for p in PRESETS.values())
}


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's embedding rows: ``vocab_size`` padded up to a multiple of ``make_vocab_size_divisible_by *
    tensor_model_parallel_size`` (what ``pretrain_gpt.py`` builds, so what a checkpoint must hold)."""
    multiple = divisible_by * tensor_parallel
    return math.ceil(vocab_size / multiple) * multiple


def get_preset(name: str) -> TNLConfig:
    """The preset called ``name`` (e.g. "tnl-1b" or "tnl-1b-hybrid"; "tnl_1b" works too)."""
    key = name.replace("_", "-").lower()
    for presets in (PRESETS, HYBRID_PRESETS):
        if key in presets:
            return presets[key]
    raise KeyError(f"unknown preset {name!r}; expected one of {', '.join([*PRESETS, *HYBRID_PRESETS])}")


def _table(presets: list[TNLConfig], width: int = 10) -> str:
    columns = f"{'layers':>6} {'D':>6} {'heads':>5} {'dh':>4} {'G':>6} {'s_emb':>6} {'params':>16}  source"
    head = f"{'preset':<{width}} {columns}"
    rows = [head, "-" * len(head)]
    for p in presets:
        s_emb = f"{p.embedding_scale:.2f}" if p.scale_embedding else "1"
        rows.append(
            f"{p.name:<{width}} {p.num_layers:>6} {p.hidden_size:>6} {p.num_heads:>5} {p.head_dim:>4} "
            f"{p.glu_size:>6} {s_emb:>6} {p.num_parameters():>16,}  {p.source}"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(_table(list(PRESETS.values())))
    print()
    print(_table(list(HYBRID_PRESETS.values()), width=16))
