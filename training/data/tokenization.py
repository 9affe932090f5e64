"""A small offline WordPiece tokenizer for the synthetic data (no downloads)."""

from __future__ import annotations

import os
import tempfile

from transformers import BertTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_tokenizer(words: list[str], directory: str | None = None) -> BertTokenizerFast:
    """Builds a BERT WordPiece tokenizer whose vocabulary is the special tokens followed by `words`.

    The vocabulary is [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then the words lower-cased and deduplicated in
    order of first appearance.

    Args:
        words: whole words; each must be non-empty with no whitespace (BERT pre-tokenization splits on it).
        directory: where to write `vocab.txt` (and the saved tokenizer files); a temporary directory if None.

    Returns:
        A `BertTokenizerFast` with `do_lower_case=True`.

    Raises:
        ValueError: if a word is empty or contains whitespace.
    """
    vocab: list[str] = list(SPECIAL_TOKENS)
    seen = set(vocab)
    for index, word in enumerate(words):
        if not isinstance(word, str) or not word.strip() or len(word.split()) != 1:
            raise ValueError(f"words[{index}] = {word!r} is not a single non-empty word")
        word = word.lower()
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    if directory is None:
        # the fast tokenizer holds its vocabulary in memory, so the file can go once it is built
        with tempfile.TemporaryDirectory() as tmp:
            return _from_vocab(vocab, tmp)
    os.makedirs(directory, exist_ok=True)
    tokenizer = _from_vocab(vocab, directory)
    tokenizer.save_pretrained(directory)  # so AutoTokenizer.from_pretrained(directory) works too
    return tokenizer


def _from_vocab(vocab: list[str], directory: str) -> BertTokenizerFast:
    path = os.path.join(directory, "vocab.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary file as `vocab` (the old `vocab_file` keyword is silently ignored)
    return BertTokenizerFast(vocab=path, do_lower_case=True, model_max_length=512)


def synthetic_tokenizer(directory: str | None = None) -> BertTokenizerFast:
    """The tokenizer for the built-in synthetic scene captions (`training.data.SYNTHETIC_WORDS`)."""
    from .scenes import SYNTHETIC_WORDS

    return build_tokenizer(SYNTHETIC_WORDS, directory)


__all__ = ["SPECIAL_TOKENS", "build_tokenizer", "synthetic_tokenizer"]
