"""The floor a careful engineer measures first: a linear probe (logistic regression) on frozen, mean-pooled,
normalized sentence embeddings (MiniLM through sentence-transformers, the drift monitor's embedder)."""

from __future__ import annotations

from typing import Any, Callable, Optional

from tuneline.classify.data import Examples, LabelSet


def embed_texts(texts: tuple[str, ...] | list[str], embed: Optional[Callable[[list[str]], Any]] = None) -> Any:
    import numpy as np

    if embed is None:
        from tuneline.monitoring.drift import default_embedder

        embed = default_embedder()
    vectors = embed.encode(list(texts)) if hasattr(embed, "encode") else embed(list(texts))
    return np.asarray(vectors, dtype=np.float32)


def linear_probe(train: Examples, test: Examples, *, seed: int = 0, c: float = 10.0,
                 embed: Optional[Callable[[list[str]], Any]] = None) -> tuple[Any, LabelSet]:
    """(test probabilities (n, K) in ``LabelSet`` order, the label set) of a logistic regression trained on
    the train split's embeddings."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    labels = LabelSet.from_labels(train.labels)
    y = np.asarray(labels.encode(train.labels, "probe train split"))
    labels.encode(test.labels, "probe test split")
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    clf.fit(embed_texts(train.texts, embed), y)
    probs = np.zeros((len(test), len(labels)), dtype=np.float64)
    probs[:, clf.classes_] = clf.predict_proba(embed_texts(test.texts, embed))
    return probs, labels
