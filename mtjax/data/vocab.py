"""Vocabularies: the byte vocabulary of the demo, or a local SentencePiece model."""

import functools
import os

import seqio


@functools.cache
def get_vocabulary(name: str) -> seqio.Vocabulary:
    """Returns the vocabulary called `name`; cached, so equal names give the same object.

    Args:
        name: `"byte"` for `seqio.ByteVocabulary()` (UTF-8 bytes, needs no download), or the path
            of a local SentencePiece `.model` file.

    Returns:
        The seqio vocabulary.

    Raises:
        FileNotFoundError: `name` is neither `"byte"` nor an existing file.
    """
    if name == "byte":
        return seqio.ByteVocabulary()
    if not os.path.isfile(name):
        raise FileNotFoundError(
            f"Vocabulary {name!r} is neither 'byte' nor an existing SentencePiece .model file. "
            "mtjax never downloads vocabularies: copy the .model file to this machine first."
        )
    return seqio.SentencePieceVocabulary(name)


def padded_vocab_size(vocab: seqio.Vocabulary, multiple: int = 128) -> int:
    """Returns `vocab.vocab_size` rounded up to a multiple of `multiple`: the model's vocab size.

    Why: embedding and logits matrices shard and tile better when the vocab axis divides evenly.
    """
    return -(-vocab.vocab_size // multiple) * multiple
