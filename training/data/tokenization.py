"""Small offline WordPiece tokenizers (no downloads): for the synthetic data, or built from your own captions."""

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


def tokenizer_from_captions(json_paths: str | list[str], directory: str | None = None,
                            field: str = "caption") -> BertTokenizerFast:
    """A WordPiece tokenizer whose vocabulary is every word of your own captions (offline, no download).

    Captions are split as BERT splits them (lower-cased, accents stripped, punctuation split off); the words are kept
    in order of first appearance, so the same files give the same vocabulary. Words seen in no caption become [UNK].

    Args:
        json_paths: one or more JSON files: ALBEF / X-VLM records ({"caption": str | [str, ...]}) or, with
            `field="sentence"`, X-VLM NLVR2 records.
        directory: where to save the tokenizer (`--tokenizer DIRECTORY` then loads it); a temporary one if None.
        field: the record field holding the text.

    Raises:
        ValueError: naming the file and record index of a record without a string (or list of strings) `field`.
    """
    import json

    from tokenizers import normalizers, pre_tokenizers

    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words: list[str] = []
    for path in [json_paths] if isinstance(json_paths, str) else json_paths:
        with open(path, encoding="utf-8") as handle:
            records = json.load(handle)
        for index, record in enumerate(records if isinstance(records, list) else [records]):
            texts = record.get(field) if isinstance(record, dict) else None
            texts = [texts] if isinstance(texts, str) else texts
            if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
                raise ValueError(f"{path}: record {index} has no {field!r} string (or list of strings)")
            for text in texts:
                words += [word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))]
    return build_tokenizer(words, directory)


def synthetic_tokenizer(directory: str | None = None) -> BertTokenizerFast:
    """The tokenizer for the built-in synthetic scene captions (`training.data.SYNTHETIC_WORDS`)."""
    from .scene_language import SYNTHETIC_WORDS

    return build_tokenizer(SYNTHETIC_WORDS, directory)


__all__ = ["SPECIAL_TOKENS", "build_tokenizer", "synthetic_tokenizer", "tokenizer_from_captions"]


def check_tokenizer_source(value: str, flag: str = "--tokenizer") -> None:
    """Raises ValueError at once, naming the path, when `value` is meant as a local folder but is not one, instead of
    letting `from_pretrained` take it for a Hub repo id (a minute of network retries, then an error that never says
    the folder is missing).

    A value is meant as a local path when it starts with ".", "/" or "~", ends with a separator, has more than one
    "/" (a Hub id has at most one: "user/name"), or its parent folder exists here ("data/tokenizr" beside "data/").
    With HF_HUB_OFFLINE set, any value that is not an existing folder is refused (nothing can be downloaded)."""
    if os.path.isdir(value):
        return
    if os.path.exists(value):
        raise ValueError(f"{flag} {value} is a file; give the tokenizer's folder (with tokenizer.json or vocab.txt)")
    parent = os.path.dirname(value.rstrip(os.sep))
    local = (value.startswith((".", os.sep, "~")) or value.endswith(os.sep) or value.count("/") > 1
             or (parent and os.path.isdir(parent)))
    if local:
        raise ValueError(f"{flag} {value}: no such folder (the path does not exist)")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline:
        raise ValueError(f"{flag} {value}: no such local folder, and HF_HUB_OFFLINE is set, so it cannot be fetched "
                         "from the Hub")
