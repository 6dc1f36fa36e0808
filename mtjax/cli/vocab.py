"""Vocabularies without downloads.

    mtjax vocab train --input FILES --size 32000 --out DIR [--force]   SentencePiece, T5 settings
    mtjax vocab encode MODEL TEXT                             ids and pieces, to check a model

`vocab train` writes DIR/spm.model (unigram; pad 0, EOS 1, UNK 2, no BOS), SentencePiece's
DIR/spm.vocab (the pieces and scores, as text) and DIR/vocab.json, and prints the summary as
JSON. Use it with `data.vocabulary=DIR/spm.model` (or in a task helper's `vocabulary=`): mtjax
adds T5's 100 sentinel ids on top, as `seqio.SentencePieceVocabulary(path, extra_ids=100)`.
"""

from __future__ import annotations

import argparse
import sys

from mtjax import outputs

HELP = "train a SentencePiece vocabulary on local text (T5 settings)"
PARSER_KWARGS = {"formatter_class": argparse.RawDescriptionHelpFormatter}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vocab_command", required=True, metavar="{train,encode}")
    train = sub.add_parser("train", allow_abbrev=False,
                           help="train a SentencePiece model on text files")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE",
                       help="text files, one sentence or document per line")
    train.add_argument("--size", type=int, default=32000,
                       help="pieces (default 32000, T5's); 100 sentinels are added on top")
    train.add_argument("--out", required=True, metavar="DIR", help="output directory")
    train.add_argument("--force", action="store_true",
                       help="replace a model already in DIR (checkpoints trained with it will "
                       "no longer match it)")
    train.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    train.add_argument("--character-coverage", type=float, default=1.0,
                       help="1.0 for small alphabets; 0.9995 for large ones (CJK)")
    train.add_argument("--lossless", action="store_true",
                       help="decode(encode(text)) == text for any text: no NFKC normalisation, "
                       "whitespace kept, unseen characters as UTF-8 bytes (256 of the pieces); "
                       "T5's settings (the default) do not round-trip such text")
    train.add_argument("--max-sentences", type=int, default=10_000_000,
                       help="lines sampled for training (default 10M)")
    encode = sub.add_parser("encode", allow_abbrev=False,
                            help="encode a text with a model (ids and pieces)")
    encode.add_argument("model", help="a SentencePiece .model file, or 'byte'")
    encode.add_argument("text")


def run(args: argparse.Namespace) -> int:
    from mtjax.data import vocab as vocab_lib

    if args.vocab_command == "train":
        summary = vocab_lib.train_sentencepiece(
            args.input, args.size, args.out, character_coverage=args.character_coverage,
            max_sentences=args.max_sentences, model_type=args.model_type,
            lossless=args.lossless, progress=True, force=args.force)
        print(outputs.dumps(summary, indent=2))
        print(f"use it with: {summary['config']}", file=sys.stderr)
        return 0
    try:
        args.text.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8 (surrogate-escaped)
        raise vocab_lib.VocabularyError("vocab encode: the text is not valid UTF-8") from None
    try:
        vocab = vocab_lib.get_vocabulary(args.model)
        ids = [int(i) for i in vocab.encode(args.text)]  # seqio loads the model on first use
    except FileNotFoundError as e:
        raise vocab_lib.VocabularyError(str(e)) from None
    except vocab_lib.VocabularyError:
        raise
    except Exception as e:  # noqa: BLE001 - SentencePiece's parser on a file that is no model
        raise vocab_lib.VocabularyError(
            f"vocab encode: {args.model} is not a SentencePiece model ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120] if str(e) else 'unreadable'})") from None
    # A byte of a multibyte character decodes to "" on its own: show the byte instead.
    special = getattr(vocab, "_num_special_tokens", 3)  # ByteVocabulary: pad, EOS, UNK
    pieces = ([vocab.tokenizer.id_to_piece(i) for i in ids] if hasattr(vocab, "tokenizer")
              else [vocab.decode([i]) or f"<0x{i - special:02X}>" for i in ids])
    print(outputs.dumps({"vocabulary": vocab_lib.describe(vocab), "ids": ids, "pieces": pieces,
                      "decoded": vocab.decode(ids)}))
    return 0
