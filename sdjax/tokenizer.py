"""A SentencePiece tokenizer trained offline on a training corpus, cached as a model file."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PAD_ID = 0  # text encoders treat id 0 as padding: masked in attention and pooling
UNK_ID = 1


def train_tokenizer(
    texts: Sequence[str], *, vocab_size: int, model_path: str | Path, case_fold: bool = False
) -> Path:
    """Trains a unigram SentencePiece model on `texts` and writes it to `model_path`.

    `case_fold`: the model lower-cases (NFKC with Unicode case folding) what it encodes.
    """
    import sentencepiece as spm

    if vocab_size < 8:
        raise ValueError(f"`vocab_size`: got {vocab_size}, expected >= 8.")
    if not texts:
        raise ValueError("`texts`: got an empty corpus, expected at least one text.")
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_path.parent) as scratch:
        prefix = Path(scratch) / "model"
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            eos_id=-1,
            character_coverage=1.0,
            normalization_rule_name="nmt_nfkc_cf" if case_fold else "nmt_nfkc",
            hard_vocab_limit=False,  # a small corpus may not support the full vocabulary
            num_threads=1,  # one thread: the same corpus gives the same model
            minloglevel=2,
        )
        # Atomic, so hosts that train the same model at once never read a partial file.
        os.replace(prefix.with_suffix(".model"), model_path)
    return model_path


def cached_tokenizer(
    texts: Sequence[str], *, vocab_size: int, cache_dir: str | Path, case_fold: bool = False
) -> Path:
    """The model for (texts, vocab_size, case_fold) under `cache_dir`, trained on first call."""
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
    folded = "_cf" if case_fold else ""
    model_path = Path(cache_dir) / f"sentencepiece_{vocab_size}{folded}_{digest}.model"
    if not model_path.exists():
        train_tokenizer(texts, vocab_size=vocab_size, model_path=model_path, case_fold=case_fold)
    return model_path


def encode(model_path: str | Path, texts: Sequence[str], *, max_length: int) -> np.ndarray:
    """Token ids, truncated and padded with PAD_ID: int32 [len(texts), max_length]."""
    import sentencepiece as spm

    if max_length < 1:
        raise ValueError(f"`max_length`: got {max_length}, expected >= 1.")
    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    tokens = np.full((len(texts), max_length), PAD_ID, np.int32)
    for row, ids in enumerate(processor.encode(list(texts))):
        ids = ids[:max_length]
        tokens[row, : len(ids)] = ids
    return tokens
