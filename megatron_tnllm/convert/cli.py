"""Command line of the converter: ``python -m megatron_tnllm.convert``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_tnllm.convert.convert import DTYPES, hf_to_megatron, megatron_to_hf
from megatron_tnllm.convert.errors import ConversionError, VerificationError
from megatron_tnllm.signals import Interrupted

EXAMPLES = """examples:
  %(prog)s hf-to-megatron TransNormerLLM-1B ckpt/tnl-1b --tensor-model-parallel-size 2 --verify
  %(prog)s megatron-to-hf ckpt/tnl-1b hf/tnl-1b --dtype bf16 --max-shard-size 2GB
"""


def _integer(minimum: int):
    """An argparse type: an integer >= ``minimum`` (TP 0, iteration -1, ... are refused before anything runs)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}; expected an integer >= {minimum}")
        return value

    parse.__name__ = "integer"
    return parse


POSITIVE, NON_NEGATIVE = _integer(1), _integer(0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_tnllm.convert",
        description="Convert TransNormerLLM checkpoints between Hugging Face and Megatron-LM, layer by layer.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("source", type=Path)
        sub.add_argument("target", type=Path, help="written via a temporary directory beside it, renamed at the end")
        sub.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="output dtype (auto: the source's)")
        sub.add_argument("--force", action="store_true", help="replace an existing target")
        sub.add_argument(
            "--verify",
            action="store_true",
            help="run the source and the converted model (whole, fp32, CPU) on the same tokens; fail (exit 3) "
            "when the logits differ by more than the tolerance of the output dtype (docs/conversion.md)",
        )
        sub.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    to_megatron = commands.add_parser(
        "hf-to-megatron", help="Hugging Face directory -> torch_dist checkpoint for pretrain_gpt.py --load"
    )
    common(to_megatron)
    to_megatron.add_argument(
        "--tensor-model-parallel-size",
        type=POSITIVE,
        default=1,
        help="TP of the training run: sets the vocabulary padding (torch_dist loads at any TP)",
    )
    to_megatron.add_argument("--pipeline-model-parallel-size", type=POSITIVE, default=1, help="PP of the training run")
    to_megatron.add_argument(
        "--num-virtual-stages-per-pipeline-rank",
        type=POSITIVE,
        default=1,
        help="virtual pipeline chunks per stage of the training run (interleaved 1F1B; recorded in the args)",
    )
    to_megatron.add_argument(
        "--make-vocab-size-divisible-by",
        type=POSITIVE,
        default=128,
        help="Megatron pads the vocabulary to a multiple of this times TP (default 128)",
    )
    to_megatron.add_argument("--padded-vocab-size", type=POSITIVE, help="embedding rows, overriding the padding rule")
    to_megatron.add_argument("--iteration", type=NON_NEGATIVE, default=0, help="iteration recorded (default 0)")
    to_megatron.add_argument(
        "--seq-length", type=POSITIVE, help="--seq-length recorded in the args (default: model_max_length, else 2048)"
    )

    to_hf = commands.add_parser(
        "megatron-to-hf", help="Megatron checkpoint (torch_dist or torch) -> Hugging Face export"
    )
    common(to_hf)
    to_hf.add_argument("--iteration", type=NON_NEGATIVE, help="iteration to read (default: the tracker file's)")
    to_hf.add_argument("--vocab-size", type=POSITIVE, help="true vocabulary size (default: the tokenizer model's)")
    to_hf.add_argument(
        "--tokenizer-model",
        type=Path,
        help="SentencePiece model to export (default: args.tokenizer_model if it exists)",
    )
    to_hf.add_argument(
        "--scale-embedding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="embedding scale sqrt(D) or 1 (default: from the checkpoint's --spec)",
    )
    to_hf.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "hf-to-megatron":
            result = hf_to_megatron(
                args.source, args.target,
                tensor_parallel=args.tensor_model_parallel_size, pipeline_parallel=args.pipeline_model_parallel_size,
                virtual_stages=args.num_virtual_stages_per_pipeline_rank,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, padded_vocab=args.padded_vocab_size,
                dtype=args.dtype, iteration=args.iteration, seq_length=args.seq_length, force=args.force,
                verify=args.verify, progress=args.progress,
            )  # fmt: skip
        else:
            result = megatron_to_hf(
                args.source, args.target,
                iteration=args.iteration, vocab_size=args.vocab_size, tokenizer_model=args.tokenizer_model,
                scale_embedding=args.scale_embedding, dtype=args.dtype, max_shard_size=args.max_shard_size,
                force=args.force, verify=args.verify, progress=args.progress,
            )  # fmt: skip
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, VerificationError) else 2
    except (KeyboardInterrupt, Interrupted) as e:
        signum = e.signum if isinstance(e, Interrupted) else 2
        print(f"error: {str(e) or 'interrupted by SIGINT'}; nothing was written", file=sys.stderr)
        return 128 + signum
    print(
        f"wrote {result.output}: {result.tensors} tensors, {result.bytes / 1e9:.3f} GB; "
        f"vocabulary {result.vocab_size} (padded to {result.padded_vocab_size} in Megatron)"
    )
    return 0
