"""A non-neural reference for debtags: TF-IDF features and one-vs-rest logistic regression.

It answers "how good is good" for the suite's text results: the same train/test split, the
same label columns and the same metric code (`sdjax.metrics.multilabel_metrics`) as the
linear probes of the experiment suite, with whole descriptions instead of 48 tokens.
`tfidf_scores` is the model; the tuning protocol (experiments/protocol.py) tunes its C and
n-gram range on the validation split like any other entry, while this command fits it once
with C = 4, the value the suite first used (chosen on test). Writes
`results/debtags_reference.json`. About 2 minutes on the 2-core CPU.

COMMAND:
  python -m experiments.text_reference
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from absl import app, flags

RESULTS = Path(__file__).resolve().parent / "results"
FLAGS = flags.FLAGS


def tfidf_scores(
    train_texts: list[str],
    train_labels: np.ndarray,
    scored_texts: dict[str, list[str]],
    *,
    inverse_regularization: float = 4.0,
    max_ngram: int = 1,
) -> tuple[dict[str, np.ndarray], int]:
    """Fits TF-IDF (min_df=2, sublinear tf, word n-grams up to `max_ngram`) and one-vs-rest
    logistic regression (C = `inverse_regularization`) on the training texts; returns
    ({split: scores [N, C]} for each of `scored_texts`, the vocabulary size).

    Deterministic: the same inputs give the same scores (lbfgs, no random state).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    vectorizer = TfidfVectorizer(min_df=2, sublinear_tf=True, ngram_range=(1, max_ngram))
    classifier = OneVsRestClassifier(
        LogisticRegression(C=inverse_regularization, max_iter=300)
    ).fit(vectorizer.fit_transform(train_texts), train_labels)
    scores = {
        split: classifier.predict_proba(vectorizer.transform(texts))
        for split, texts in scored_texts.items()
    }
    return scores, len(vectorizer.vocabulary_)


def main(argv):
    del argv
    from sdjax import metrics
    from sdjax.datasets import debtags

    start = time.time()
    corpus, _ = debtags.corpus(FLAGS.data_dir)
    (train_texts, train_labels), (test_texts, test_labels) = corpus["train"], corpus["test"]
    scores, vocabulary = tfidf_scores(
        train_texts,
        train_labels,
        {"test": test_texts},
        inverse_regularization=FLAGS.inverse_regularization,
    )
    result = {
        "model": f"TF-IDF (min_df=2, sublinear tf) + one-vs-rest logistic regression, "
        f"C={FLAGS.inverse_regularization}",
        "vocabulary": vocabulary,
        "test": metrics.multilabel_metrics(scores["test"], test_labels),
        "wall_seconds": time.time() - start,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "debtags_reference.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    # Defined here, not on import: the protocol's runner imports `tfidf_scores` and has its own.
    flags.DEFINE_string("data_dir", "", "tfds data dir; '' = $TFDS_DATA_DIR or the sdjax cache.")
    flags.DEFINE_float("inverse_regularization", 4.0, "Logistic regression's C.")
    app.run(main)
