"""A non-neural reference for debtags: TF-IDF features and one-vs-rest logistic regression.

It answers "how good is good" for the suite's text results: the same train/test split, the same
label columns and the same metric code (`sdjax.evaluation.multilabel_metrics`) as the linear
probes of the experiment suite, with whole descriptions instead of 48 tokens. Writes
`results/debtags_reference.json`. About 2 minutes on the 2-core CPU.

COMMAND:
  python -m experiments.text_reference
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags

RESULTS = Path(__file__).resolve().parent / "results"
FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "", "tfds data dir; '' = $TFDS_DATA_DIR or the sdjax cache.")
flags.DEFINE_float("inverse_regularization", 4.0, "Logistic regression's C.")


def main(argv):
    del argv
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from sdjax import evaluation, input_pipeline

    start = time.time()
    corpus, _ = input_pipeline.debtags_corpus(FLAGS.data_dir)
    (train_texts, train_labels), (test_texts, test_labels) = corpus["train"], corpus["test"]
    vectorizer = TfidfVectorizer(min_df=2, sublinear_tf=True)
    classifier = OneVsRestClassifier(
        LogisticRegression(C=FLAGS.inverse_regularization, max_iter=300)
    ).fit(vectorizer.fit_transform(train_texts), train_labels)
    scores = classifier.predict_proba(vectorizer.transform(test_texts))
    result = {
        "model": f"TF-IDF (min_df=2, sublinear tf) + one-vs-rest logistic regression, "
        f"C={FLAGS.inverse_regularization}",
        "vocabulary": len(vectorizer.vocabulary_),
        "test": evaluation.multilabel_metrics(scores, test_labels),
        "wall_seconds": time.time() - start,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "debtags_reference.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
