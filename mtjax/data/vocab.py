"""Vocabularies: the byte vocabulary (ByT5), or a local SentencePiece model (T5 style).

Nothing is downloaded: `mtjax vocab train` makes a SentencePiece model from local text files
with T5's settings (unigram; pad 0, EOS 1, UNK 2, no BOS), and `get_vocabulary(path)` wraps it
as `seqio.SentencePieceVocabulary(path, extra_ids=100)`, the 100 sentinels of span corruption.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Sequence

import seqio

from mtjax.errors import UserError

EXTRA_IDS = 100  # T5's sentinels <extra_id_0> .. <extra_id_99>, the top ids of the vocabulary
# T5's special ids (no BOS): seqio pads with 0, and mtjax's decoder stops at 1.
T5_SPECIAL_IDS = {"pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1}


class VocabularyError(UserError, ValueError):
    """A vocabulary that cannot be used as asked; the message says why and the fix."""


@functools.cache
def get_vocabulary(name: str) -> seqio.Vocabulary:
    """Returns the vocabulary called `name`; cached, so equal names give the same object.

    Args:
        name: `"byte"` for `seqio.ByteVocabulary()` (UTF-8 bytes, needs no download), or the path
            of a local SentencePiece `.model` file (wrapped with T5's 100 extra ids).

    Returns:
        The seqio vocabulary.

    Raises:
        FileNotFoundError: `name` is neither `"byte"` nor an existing file.
        VocabularyError: the file is no SentencePiece model (e.g. `vocab train`'s spm.vocab).
    """
    if name == "byte":
        return seqio.ByteVocabulary()
    if not os.path.isfile(name):
        raise FileNotFoundError(
            f"Vocabulary {name!r} is neither 'byte' nor an existing SentencePiece .model file. "
            "mtjax never downloads vocabularies: copy the .model file to this machine first, "
            "or make one with `mtjax vocab train`."
        )
    vocab = seqio.SentencePieceVocabulary(os.path.abspath(name), extra_ids=EXTRA_IDS)
    try:
        vocab.sp_model  # noqa: B018 - seqio parses the file on first use, inside a TF map
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, or the file's OSError
        reason = str(e).splitlines()[0][:120] if str(e) else "unreadable"
        raise VocabularyError(
            f"Vocabulary {name} is not a SentencePiece model ({type(e).__name__}: {reason}); "
            f"give the .model file (`mtjax vocab train` writes spm.model, and spm.vocab beside "
            f"it as a text listing)") from None
    _check_t5_ids(name, vocab.tokenizer)
    return vocab


def _check_t5_ids(name: str, tokenizer) -> None:
    """Refuse a SentencePiece model whose special ids are not T5's (PAD 0, EOS 1, UNK 2).

    seqio pads with 0 and mtjax's decoder stops at 1 whatever the model says: with
    SentencePiece's defaults (UNK 0, BOS 1, EOS 2, no PAD) every unknown piece would be taken
    for padding (out of the loss) and decoding would never stop at the model's EOS."""
    ids = {key: getattr(tokenizer, key)() for key in ("pad_id", "eos_id", "unk_id")}
    if any(ids[key] != T5_SPECIAL_IDS[key] for key in ids):
        found = ", ".join(f"{key[:-3].upper()} {'none' if v < 0 else v}"
                          for key, v in ids.items())
        need = ", ".join(f"{key[:-3].upper()} {T5_SPECIAL_IDS[key]}" for key in ids)
        flags = " ".join(f"{key}={v}" for key, v in T5_SPECIAL_IDS.items())
        raise VocabularyError(f"Vocabulary {name} has {found}; T5 models need {need}: train "
                              f"it with {flags} (as `mtjax vocab train` does)")


# The vocabulary that task helpers use when a task does not name one: config data.vocabulary,
# set by `mtjax.data.pipeline.prepare` before the user's tasks module is imported.
_RUN_VOCABULARY: list[str | None] = [None]


def set_run_vocabulary(name: str | None) -> None:
    """Sets the vocabulary helpers give tasks that name none (None: "byte")."""
    _RUN_VOCABULARY[0] = name


def run_vocabulary() -> seqio.Vocabulary:
    """The vocabulary of tasks that name none: config data.vocabulary, else bytes."""
    return get_vocabulary(_RUN_VOCABULARY[0] or "byte")


def describe(vocab: seqio.Vocabulary) -> str:
    """A short, stable identity of a vocabulary, e.g. `byte(259)` or `spm:3f2a9c01d2e4(8100)`.

    SentencePiece models are named by a hash of their contents, so copies of one file agree
    and a retrained file does not.
    """
    if isinstance(vocab, seqio.ByteVocabulary):
        extra = f",extra_ids={vocab.extra_ids}" if vocab.extra_ids else ""
        return f"byte({vocab.vocab_size}{extra})"
    if isinstance(vocab, seqio.SentencePieceVocabulary):
        digest = hashlib.sha256(vocab.sp_model).hexdigest()[:12]
        return f"spm:{digest}({vocab.vocab_size})"
    return f"{type(vocab).__name__}({vocab.vocab_size})"


def padded_vocab_size(vocab: seqio.Vocabulary, multiple: int = 128) -> int:
    """Returns `vocab.vocab_size` rounded up to a multiple of `multiple`: the model's vocab size.

    Why: embedding and logits matrices shard and tile better when the vocab axis divides evenly.
    """
    return -(-vocab.vocab_size // multiple) * multiple


def train_sentencepiece(inputs: Sequence[str], size: int, out_dir: str, *,
                        character_coverage: float = 1.0, max_sentences: int = 10_000_000,
                        model_type: str = "unigram", lossless: bool = False,
                        quiet: bool = True, progress: bool = False, force: bool = False) -> dict:
    """Trains a SentencePiece model with T5's settings on local text files.

    Args:
        inputs: text files, one sentence or document per line.
        size: number of pieces (T5: 32000); the seqio vocabulary adds 100 sentinels on top.
        out_dir: where `spm.model`, `spm.vocab` and `vocab.json` are written.
        character_coverage: fraction of characters covered (1.0 for small alphabets,
            0.9995 for large ones such as CJK).
        max_sentences: at most this many lines are sampled for training.
        model_type: "unigram" (T5) or "bpe".
        lossless: decoding gives back exactly the encoded text: no NFKC normalisation, runs
            of whitespace kept, and characters outside the pieces as UTF-8 bytes (byte
            fallback, 256 of the pieces). T5's settings (the default) change such text.
        quiet: keep SentencePiece's own log off stderr.
        progress: say on stderr what is being trained.
        force: replace a model already in ``out_dir`` (runs trained with it are tied to its
            ids, so by default it is kept and this is an error).

    Returns:
        A summary: model path, pieces, seqio vocab size (with extra ids), padded model size.

    Raises:
        VocabularyError: no input file, a size the corpus cannot support, an ``out_dir`` that
            is a file, or one that holds a model already (without ``force``).
    """
    import sentencepiece as spm

    missing = [p for p in inputs if not os.path.isfile(p)]
    if not inputs or missing:
        raise VocabularyError(f"vocab train: input file(s) not found: {missing or '(none given)'}")
    if size < 8:
        raise VocabularyError(f"vocab train: --size must be at least 8, got {size}")
    if not 0.98 <= character_coverage <= 1.0:  # SentencePiece's own bounds (NaN fails too)
        raise VocabularyError(f"vocab train: --character-coverage must be between 0.98 and 1.0 "
                              f"(1.0 for small alphabets, 0.9995 for CJK), got "
                              f"{character_coverage}")
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise VocabularyError(f"vocab train: --out {out_dir} is a file; give a directory (the "
                              f"model is written as DIR/spm.model)")
    if (out / "spm.model").exists() and not force:
        raise VocabularyError(
            f"vocab train: {out / 'spm.model'} exists, and runs trained with it need it as it "
            f"is; give another --out, or --force to replace it")
    if progress:
        print(f"training a {model_type} SentencePiece model of {size} pieces on "
              f"{len(inputs)} file(s) ...", file=sys.stderr, flush=True)
    created = [d for d in (out, *out.absolute().parents) if not d.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    # Trained beside, moved into place when done: a failure leaves the old model as it was.
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=".spm-training-", dir=out))
    try:
        _train_into(spm, scratch / "spm", inputs, size, model_type, character_coverage,
                    max_sentences, lossless, quiet)
        for suffix in (".vocab", ".model"):
            os.replace(scratch / f"spm{suffix}", out / f"spm{suffix}")
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        for directory in created:  # nor the empty --out (and its parents) made for it
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    prefix = str(out / "spm")
    vocab = seqio.SentencePieceVocabulary(prefix + ".model", extra_ids=EXTRA_IDS)
    summary = {
        "model": os.path.abspath(prefix + ".model"),
        "pieces": size,
        "extra_ids": EXTRA_IDS,
        "lossless": lossless,
        "vocab_size": vocab.vocab_size,
        "model_vocab_size": padded_vocab_size(vocab),
        "id": describe(vocab),
        "inputs": [os.path.abspath(p) for p in inputs],
        "config": f"data.vocabulary={os.path.abspath(prefix + '.model')}",
    }
    (out / "vocab.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# What --lossless changes from T5's settings: SentencePiece's NFKC rule turns "ﬁ" into "fi",
# its whitespace rule collapses runs of spaces, and a character it never saw becomes UNK.
LOSSLESS_OPTIONS = {"normalization_rule_name": "identity", "remove_extra_whitespaces": False,
                    "byte_fallback": True}


def _train_into(spm, prefix: pathlib.Path, inputs: Sequence[str], size: int, model_type: str,
                character_coverage: float, max_sentences: int, lossless: bool,
                quiet: bool) -> None:
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(inputs), model_prefix=str(prefix), vocab_size=size,
            model_type=model_type, character_coverage=character_coverage,
            **T5_SPECIAL_IDS,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            max_sentence_length=1 << 16, minloglevel=2 if quiet else 0,
            **(LOSSLESS_OPTIONS if lossless else {}),
        )
    except RuntimeError as e:
        # e.g. "Vocabulary size too high (8000). Please set it to a value <= 1234."
        reason = str(e).strip().rsplit("] ", 1)[-1]  # drop SentencePiece's source location
        if "sentences_.empty()" in reason:  # "INTERNAL: src/trainer_interface.cc(467) [...]"
            reason = "the input files hold no text (every line is empty)"
        reason = reason.replace("--character_coverage", "--character-coverage")
        if lossless and "required_chars" in reason:
            reason += " --lossless counts the 256 byte pieces among the characters."
        raise VocabularyError(f"vocab train: SentencePiece failed: {reason} (--size {size}, "
                              f"{len(inputs)} input file(s))") from None
