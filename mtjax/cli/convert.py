"""Convert T5 checkpoints: Hugging Face (config.json + safetensors or pytorch_model.bin) or T5X
into an mtjax checkpoint that `mtjax train --init-from DST` starts from, and mtjax checkpoints
into Hugging Face config.json + model.safetensors. The vocabulary travels along. Prints a JSON
summary on stdout; progress goes to stderr.

examples:
  mtjax convert hf/t5-v1_1-base ckpt/t5_base              (Hugging Face -> mtjax)
  mtjax convert t5x/t5_1_1_base/checkpoint_1000000 ckpt/t5x --vocab spiece.model
  mtjax convert runs/finetune hf_out --to hf              (mtjax -> Hugging Face)"""

from __future__ import annotations

import argparse

from mtjax import outputs

HELP = "import Hugging Face / T5X checkpoints; export to Hugging Face"
PARSER_KWARGS = {"formatter_class": argparse.RawDescriptionHelpFormatter}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="Hugging Face model directory, T5X "
                        "checkpoint directory, or mtjax run/checkpoint directory")
    parser.add_argument("dst", metavar="DST", help="output directory")
    parser.add_argument("--from", dest="from_format", choices=("hf", "t5x", "mtjax"),
                        default=None, help="format of SRC (default: detected from its files)")
    parser.add_argument("--to", dest="to_format", choices=("mtjax", "hf"), default="mtjax",
                        help="format of DST (default: mtjax)")
    parser.add_argument("--vocab", default=None, metavar="FILE|byte",
                        help="the vocabulary: a SentencePiece .model file or 'byte' (default: "
                        "the one in SRC: spiece.model, a ByT5 tokenizer, or the one an mtjax "
                        "checkpoint records)")


def run(args: argparse.Namespace) -> int:
    from mtjax import interop

    summary = interop.convert(args.src, args.dst, from_format=args.from_format,
                              to_format=args.to_format, vocab=args.vocab)
    print(outputs.dumps(summary, indent=2))
    return 0
