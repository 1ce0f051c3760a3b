"""Multi-query associative recall (MQAR): pure TNL, hybrid TNL and pure softmax attention of one size.

A sequence holds N key-value pairs, then N queries: each query is one of the keys, and the model must
predict its value as the next token (Zoology's MQAR, arXiv 2312.04927, with the queries at the end):

    k_1 v_1 k_2 v_2 ... k_N v_N   q_1 a_1 q_2 a_2 ... q_N a_N       (q_i: a key of the context, a_i its value)

Keys and values come from disjoint halves of the vocabulary; the loss and the accuracy count the answers
a_i only. Each model trains on a mix of sequence lengths (N = length / 4) and is scored, per length, on fresh
sequences, at the training lengths or at ``--eval-lengths`` (longer ones: more pairs than it trained on). The
models are the Hugging Face class of this package with the same width, depth, heads and SGLU: ``tnl``
(lightning attention everywhere, LRPE on layer 0), ``hybrid`` (softmax attention on every second layer, the
others TNL), ``softmax`` (softmax attention everywhere, no position encoding: the hybrid's softmax layer alone)
and ``softmax_rope`` (the same with rotary position embedding on q and k, the usual softmax baseline: MQAR binds
each value to the key before it, a previous-token step that a position-free softmax model finds hard).

    python tools/recall_task.py --out DIR          # the full run (defaults below), meant for one GPU
    python tools/recall_task.py --smoke --out DIR  # a few steps of each model, seconds (checks the tool)
    python tools/recall_task.py --combine RUN_DIR... --out DIR  # one plot and table of several runs (seeds, heads)

Writes DIR/recall.json (accuracy per model and length, settings, steps trained), DIR/recall.md (a table) and,
with matplotlib, DIR/hybrid_recall.png. Ctrl-C (SIGINT) ends the training of the model in progress: it is scored
as it is (its row shows the steps it had) and the run goes on with the next model. ``--combine`` reads the
recall.json of earlier runs and draws every run as one line, a panel per head count (DIR/recall_runs.png), with
DIR/recall_runs.md listing them.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_tnllm.configs import TNLConfig, softmax_every
from megatron_tnllm.convert.layout import hf_config_from_tnl
from megatron_tnllm.hf import TransnormerForCausalLM
from megatron_tnllm.hf.modeling_transnormer import SoftmaxAttention, project

MODELS = ("tnl", "hybrid", "softmax", "softmax_rope")
ROPE_BASE = 10000.0


def rotate(x: torch.Tensor, base: float = ROPE_BASE) -> torch.Tensor:
    """RoPE (rotate-half form) of x [b, h, n, d] at positions 0..n-1."""
    n, d = x.shape[-2], x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head size; got {d}")
    dtype = torch.promote_types(x.dtype, torch.float32)  # angles in fp32 at least (fp64 for fp64 inputs)
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=dtype) / d)  # [d / 2]
    angle = torch.arange(n, device=x.device, dtype=dtype)[:, None] * inv_freq  # [n, d / 2]
    cos, sin = torch.cat([angle.cos(), angle.cos()], -1), torch.cat([angle.sin(), angle.sin()], -1)
    half1, half2 = x.to(dtype).chunk(2, dim=-1)
    return (x.to(dtype) * cos + torch.cat([-half2, half1], -1) * sin).to(x.dtype)


class RopeSoftmaxAttention(SoftmaxAttention):
    """The ``softmax_rope`` baseline's attention: :class:`SoftmaxAttention` with RoPE on q and k.

    Whole sequences only (training and scoring here run without a cache or padding).
    """

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, kv: tuple | None, residual: torch.Tensor | None = None
    ) -> tuple:
        """x [b, n, D] -> (residual + output [b, n, D], (keys, values) [b, h, n, d])."""
        if key_mask is not None or kv is not None:
            raise ValueError("RopeSoftmaxAttention takes whole unpadded sequences (no key_mask, no cache)")
        b, n, width = x.shape
        q, k, v = project(x, self.qkv_proj).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate(q), rotate(k)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return project(o.transpose(1, 2).reshape(b, n, width), self.out_proj, residual), (k, v)


def mqar_batch(batch: int, length: int, num_keys: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [batch, length], answer_mask [batch, length]); answer_mask is True where the next token is an answer.

    Token ids: keys 1..num_keys, values num_keys + 1..2 num_keys (0 is padding, never used).
    """
    if length % 4:
        raise ValueError(f"sequence length {length} is not a multiple of 4 (N pairs + N queries, 2 tokens each)")
    pairs = length // 4
    if pairs > num_keys:
        raise ValueError(f"length {length} needs {pairs} distinct keys; --num-keys is {num_keys}")
    keys = torch.rand(batch, num_keys, generator=generator).argsort(-1)[:, :pairs] + 1  # distinct per row
    values = torch.randint(num_keys + 1, 2 * num_keys + 1, (batch, pairs), generator=generator)
    order = torch.rand(batch, pairs, generator=generator).argsort(-1)  # which pair each query asks for
    queries, answers = keys.gather(1, order), values.gather(1, order)
    context = torch.stack([keys, values], -1).flatten(1)
    asked = torch.stack([queries, answers], -1).flatten(1)
    ids = torch.cat([context, asked], 1)
    answer_mask = torch.zeros_like(ids, dtype=torch.bool)
    answer_mask[:, 2 * pairs :: 2] = True  # the query positions: their next token is the answer
    return ids, answer_mask


def length_at(step: int, lengths: list[int], short_first: int) -> int:
    """The training length of ``step``: the shortest of ``lengths`` for the first ``short_first`` steps, then
    ``lengths`` in turn."""
    return min(lengths) if step < short_first else lengths[step % len(lengths)]


def build(kind: str, shape: TNLConfig, device: torch.device) -> TransnormerForCausalLM:
    """Model ``kind`` (one of MODELS) of ``shape``, randomly initialised."""
    layers = shape.num_layers
    if kind == "tnl":
        tnl, softmax = shape, []
    elif kind == "hybrid":
        tnl, softmax = shape, list(softmax_every(layers, 2))
    elif kind in ("softmax", "softmax_rope"):
        tnl, softmax = shape.replace(lrpe_layers=()), list(range(layers))
    else:
        raise ValueError(f"model {kind!r}; expected one of {MODELS}")
    config = hf_config_from_tnl(tnl)
    config.softmax_attention_layers = softmax
    model = TransnormerForCausalLM(config)
    if kind == "softmax_rope":  # same initial weights as ``softmax``; only the attention's positions differ
        for layer in model.model.layers:
            rope = RopeSoftmaxAttention(config)
            rope.load_state_dict(layer.token_mixer.state_dict())
            layer.token_mixer = rope
    return model.to(device)


def answer_loss_and_hits(model, ids: torch.Tensor, answer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the answers and the per-answer correctness (argmax), bool [answers]."""
    logits = model(ids[:, :-1], use_cache=False).logits  # position t predicts token t + 1
    picked = logits[answer_mask[:, :-1]].float()
    target = ids[:, 1:][answer_mask[:, :-1]]
    return F.cross_entropy(picked, target), picked.argmax(-1) == target


def train(kind: str, args, shape: TNLConfig, device: torch.device) -> tuple[dict[int, float], int]:
    """Trains model ``kind`` on the mixed lengths; returns ({length: answer accuracy on fresh sequences}, steps
    trained)."""
    torch.manual_seed(args.seed)
    model = build(kind, shape, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    model.train()
    stop = []  # Ctrl-C: the first ends training after the step in progress, a second stops the run at once

    def on_sigint(*_) -> None:
        if stop:
            raise KeyboardInterrupt
        stop.append(True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    done = 0
    for step in range(args.steps):
        if stop:
            print(f"{kind:>7} interrupted after {done} of {args.steps} steps; scoring it as it is", flush=True)
            break
        length = length_at(step, args.lengths, args.short_first)
        ids, mask = mqar_batch(args.batch, length, args.num_keys, g)
        loss, hits = answer_loss_and_hits(model, ids.to(device), mask.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        if step % args.log_every == 0 or step == args.steps - 1:
            print(
                f"{kind:>7} step {step:5d} length {length:4d} loss {loss.item():.3f} "
                f"acc {hits.float().mean().item():.3f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    model.eval()
    g_eval = torch.Generator().manual_seed(args.seed + 1)
    accuracy = {}
    with torch.no_grad():
        for length in args.eval_lengths:
            hits = [
                answer_loss_and_hits(
                    model, *(t.to(device) for t in mqar_batch(args.batch, length, args.num_keys, g_eval))
                )[1]
                for _ in range(args.eval_batches)
            ]
            accuracy[length] = torch.cat(hits).float().mean().item()
    signal.signal(signal.SIGINT, previous)
    return accuracy, done


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (and a notice) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt


def length_columns(lengths: list[int]) -> str:
    """The table header cells of the scored lengths: "L=16 (N=4) | L=32 (N=8) | ..."."""
    return " | ".join(f"L={n} (N={n // 4})" for n in lengths)


def length_axis(ax, lengths: list[int]) -> None:
    """A plot's x axis of sequence lengths (log 2, a tick per length) and its accuracy range, with a grid."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sequence length (key-value pairs = length / 4)")
    ax.grid(alpha=0.3)


def write_results(out: Path, results: dict[str, dict[int, float]], settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "recall.json").write_text(json.dumps({"settings": settings, "accuracy": results}, indent=2) + "\n")
    lengths = settings["eval_lengths"]
    steps = settings["steps_done"]
    rows = [f"| model | steps | {length_columns(lengths)} |"]
    rows.append("|---" * (len(lengths) + 2) + "|")
    rows += [
        f"| {kind} | {steps[kind]} | " + " | ".join(f"{acc[n]:.3f}" for n in lengths) + " |"
        for kind, acc in results.items()
    ]
    (out / "recall.md").write_text("\n".join(rows) + "\n")
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for kind, acc in results.items():
        ax.plot(lengths, [acc[n] for n in lengths], marker="o", label=kind)
    trained = max(settings["lengths"])
    if lengths[-1] > trained:  # shade the lengths longer than any trained on: recall of more pairs than seen
        ax.axvspan(trained * 2**0.5, lengths[-1] * 1.2, color="0.9", label="longer than trained")
    length_axis(ax, lengths)
    ax.set_xlim(lengths[0] / 1.2, lengths[-1] * 1.2)
    ax.set_ylabel("recall accuracy")
    ax.set_title(f"MQAR, D={settings['hidden_size']}, {settings['layers']} layers, {settings['heads']} heads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "hybrid_recall.png", dpi=120)


def write_combined(out: Path, runs: list[dict]) -> None:
    """``out``/recall_runs.md (one row per model of each run) and recall_runs.png (every run a line, coloured by
    model, a panel per head count) from runs' recall.json contents."""
    rows = []
    for run in runs:
        st = run["settings"]
        for kind, acc in run["accuracy"].items():
            rows.append((st["heads"], kind, st["seed"], st["lr"], st["steps_done"][kind], acc))
    rows.sort(key=lambda r: (r[0], MODELS.index(r[1]), r[2], -r[3]))
    lengths = sorted({int(n) for *_, acc in rows for n in acc})
    table = [f"| heads | model | seed | lr | steps | {length_columns(lengths)} |"]
    table.append("|---" * (len(lengths) + 5) + "|")
    for heads, kind, seed, lr, steps, acc in rows:
        cells = " | ".join(f"{acc[str(n)]:.3f}" if str(n) in acc else "" for n in lengths)
        table.append(f"| {heads} | {kind} | {seed} | {lr:g} | {steps} | {cells} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "recall_runs.md").write_text("\n".join(table) + "\n")
    plt = pyplot()
    if plt is None:
        return
    panels = sorted({r[0] for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), sharey=True, squeeze=False)
    # the hybrid dashed on top: where it recalls perfectly it lies on the softmax_rope line
    styles = {
        "tnl": dict(color="C0", ls="-", lw=1.2, zorder=2),
        "hybrid": dict(color="C1", ls="--", lw=1.8, zorder=4),
        "softmax": dict(color="C2", ls=":", lw=1.5, zorder=2),
        "softmax_rope": dict(color="C3", ls="-", lw=3.5, alpha=0.4, zorder=3),
    }
    for ax, heads in zip(axes[0], panels):
        shown = set()
        for h, kind, _, _, _, acc in rows:
            if h != heads:
                continue
            xs = sorted(int(n) for n in acc)
            label = None if kind in shown else kind
            shown.add(kind)
            ax.plot(xs, [acc[str(n)] for n in xs], marker="o", ms=3, label=label, **styles[kind])
        length_axis(ax, lengths)
        ax.set_title(f"{heads} heads (one line per run)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("recall accuracy")
    fig.tight_layout()
    fig.savefig(out / "recall_runs.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="a few steps at short lengths (checks the tool)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument(
        "--eval-lengths",
        type=int,
        nargs="+",
        help="lengths to score at (default: --lengths); longer ones test recall of more pairs than trained on",
    )
    p.add_argument("--num-keys", type=int, default=64, help="distinct keys (and values) in the vocabulary")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=18000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--short-first",
        type=int,
        help="train the first SHORT_FIRST steps on the shortest of --lengths only, then on all in turn "
        "(default 4000; 0 with --smoke)",
    )
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--combine", type=Path, nargs="+", metavar="RUN_DIR", help="plot earlier runs' recall.json")
    args = p.parse_args()
    if args.combine:
        write_combined(args.out, [json.loads((run / "recall.json").read_text()) for run in args.combine])
        print((args.out / "recall_runs.md").read_text())
        return
    if args.smoke:
        args.lengths, args.steps, args.batch, args.eval_batches, args.log_every = [16, 32], 4, 4, 1, 2
    if args.short_first is None:
        args.short_first = 0 if args.smoke else 4000
    args.eval_lengths = args.eval_lengths or args.lengths
    for length in {*args.lengths, *args.eval_lengths}:
        mqar_batch(1, length, args.num_keys, torch.Generator())  # a bad length or too few keys fails here, not late
    shape = TNLConfig(
        name="mqar",
        num_layers=args.layers,
        hidden_size=args.hidden_size,
        num_heads=args.heads,
        glu_size=2 * args.hidden_size,
        vocab_size=2 * args.num_keys + 1,
        seq_length=max(args.lengths + args.eval_lengths),
    )
    device = torch.device(args.device)
    results, steps_done = {}, {}
    for kind in args.models:
        results[kind], steps_done[kind] = train(kind, args, shape, device)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "device")}
    settings.update(device=str(device), torch=torch.__version__, steps_done=steps_done)
    write_results(args.out, results, settings)
    print((args.out / "recall.md").read_text())


if __name__ == "__main__":
    main()
