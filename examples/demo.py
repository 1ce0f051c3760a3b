"""Train tnl-tiny with Megatron-Core on a CPU, end to end, in a few minutes.

1. trains a SentencePiece tokenizer on Tiny Shakespeare (public domain, shipped in examples/data);
2. writes the tokens in Megatron's indexed-dataset format and reads them with Megatron's GPTDataset;
3. trains the TNL GPTModel (LRPE, scaled embeddings, SGLU, lightning attention) with AdamW;
4. saves a torch_dist checkpoint as pretrain_gpt.py does (args included, so ``--load`` and
   ``python -m megatron_tnllm.convert megatron-to-hf`` read it), reloads it into a fresh model and checks the
   loss is unchanged;
5. prints a greedy continuation of a prompt.

Run: bash setup.sh && .venv/bin/python examples/demo.py   (options: --help)
Megatron-Core is a GPU library; on a CPU it needs a few CUDA calls stubbed (tests/cpu_shims.py).
"""

from __future__ import annotations

import argparse
import gzip
import logging
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # no torch.compile warm-up on a 2-core CPU
warnings.filterwarnings("ignore")  # Megatron warns about every missing GPU extension (TE, apex, ...)
logging.disable(logging.WARNING)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

DATA = REPO / "examples" / "data" / "tinyshakespeare.txt.gz"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "demo", help="work directory (replaced)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--prompt", default="ROMEO:\n")
    p.add_argument("--new-tokens", type=int, default=60)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


def write_indexed_dataset(docs: list[list[int]], prefix: Path, eod: int, vocab_size: int) -> None:
    """Megatron's .bin/.idx format, one document per speech, each ended by eod."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(vocab_size))
    for doc in docs:
        builder.add_document(torch.tensor(doc + [eod]), [len(doc) + 1])
    builder.finalize(f"{prefix}.idx")


def build_datasets(prefix: Path, tokenizer, args, n_train: int, n_valid: int):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=([str(prefix)], None), split="95,5,0",
        path_to_cache=str(args.out / "cache"), tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
    )  # fmt: skip
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [n_train, n_valid, 0], lambda: True, config).build()
    return train, valid


def batches(dataset, batch_size: int, seed: int):
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed)
    )
    while True:
        yield from loader


def masked_loss(model, batch) -> torch.Tensor:
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"]
    return (per_token * mask).sum() / mask.sum()


@torch.no_grad()
def evaluate(model, valid, args) -> float:
    model.eval()
    loader = torch.utils.data.DataLoader(valid, batch_size=args.batch_size)
    losses = [masked_loss(model, b).item() for _, b in zip(range(4), loader)]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def greedy(model, sp: spm.SentencePieceProcessor, prompt: str, n: int) -> str:
    """Greedy decoding by recomputing the whole prefix (the HF model has a constant-memory cache)."""
    model.eval()
    ids = sp.encode(prompt)
    for _ in range(n):
        x = torch.tensor([ids])
        logits = model(x, torch.arange(len(ids))[None], None)  # [1, s, V]
        ids.append(int(logits[0, -1].argmax()))
    return sp.decode(ids)


def main() -> None:
    args = parse_args()
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tokenizers import MegatronTokenizer

    from megatron_tnllm.convert.megatron_format import save_megatron_checkpoint
    from megatron_tnllm.models import build_model
    from megatron_tnllm.tokenizer import train_sentencepiece
    from tests.cpu_shims import apply_cpu_shims

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.manual_seed(args.seed)
    apply_cpu_shims()
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    t0 = time.time()

    from megatron_tnllm.configs import get_preset

    preset = get_preset("tnl-tiny")
    text = gzip.open(DATA, "rt", encoding="utf-8").read()
    sp = spm.SentencePieceProcessor(
        model_file=str(train_sentencepiece(text, args.out / "tokenizer", preset.vocab_size))
    )
    docs = sp.encode([d.strip() for d in text.split("\n\n") if d.strip()])
    tokenizer = MegatronTokenizer.from_pretrained(
        tokenizer_path=str(args.out / "tokenizer.model"), metadata_path={"library": "sentencepiece"}
    )
    prefix = args.out / "shakespeare_text_document"
    write_indexed_dataset(docs, prefix, tokenizer.eod, tokenizer.vocab_size)
    train, valid = build_datasets(prefix, tokenizer, args, args.steps * args.batch_size, 4 * args.batch_size)
    print(
        f"tokenizer: SentencePiece BPE, vocab {tokenizer.vocab_size}; dataset: {sum(map(len, docs)):,} tokens "
        f"in {len(docs):,} documents ({time.time() - t0:.1f} s)"
    )

    model = build_model(preset, vocab_size=tokenizer.vocab_size, use_cpu_initialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: tnl-tiny, {n_params:,} parameters, Megatron-Core GPTModel with the TNL block spec")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))),
    )
    losses = []
    data = batches(train, args.batch_size, args.seed)
    with tqdm(range(args.steps), desc="training", unit="step", dynamic_ncols=True) as bar:
        for _ in bar:
            loss = masked_loss(model, next(data))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(
        f"loss: first 10 steps {first:.3f} -> last 10 steps {last:.3f} "
        f"(uniform guess: {math.log(tokenizer.vocab_size):.3f})"
    )

    val_before = evaluate(model, valid, args)
    ckpt = args.out / "checkpoint"
    iteration_dir = save_megatron_checkpoint(
        model, preset.replace(vocab_size=tokenizer.vocab_size), ckpt, args.steps, padded_vocab=tokenizer.vocab_size,
        tokenizer_model=args.out / "tokenizer.model",
    )  # fmt: skip
    torch.manual_seed(args.seed + 1)
    reloaded = build_model(preset, vocab_size=tokenizer.vocab_size, use_cpu_initialization=True)
    loaded = dist_checkpointing.load({"model": reloaded.sharded_state_dict()}, str(iteration_dir))
    reloaded.load_state_dict(loaded["model"])
    val_after = evaluate(reloaded, valid, args)
    if abs(val_after - val_before) > 1e-5 * abs(val_before):
        raise RuntimeError(f"reloaded checkpoint gives validation loss {val_after} instead of {val_before}")
    print(f"checkpoint: torch_dist at {ckpt}; validation loss {val_before:.4f} before and {val_after:.4f} after reload")
    print(f"  to Hugging Face: python -m megatron_tnllm.convert megatron-to-hf {ckpt} {args.out / 'hf'} --verify")
    print(f"\n--- greedy continuation of {args.prompt!r} (reloaded model) ---")
    print(greedy(reloaded, sp, args.prompt, args.new_tokens))
    print(f"--- done in {time.time() - t0:.0f} s ---")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
