"""``strategy: auto``: the owner's matrix, applied to measured facts.

|                      | similar domain   | dissimilar domain |
|----------------------|------------------|-------------------|
| **small data**       | head only        | top layers + head |
| **large data**       | top layers + head| everything (full) |

*Data size* is the examples per class of the train split (the median over classes, so one large class does not
make a small task large), against ``large_data_per_class``. *Domain similarity* is the distance between the task's
texts and a reference sample of the kind of text the encoder was trained on, both embedded by the sentence
encoder (MiniLM): ``1 - cos(mean embedding of the task sample, mean embedding of the reference sample)``, against
``similar_distance``. The MMD of the drift monitor is reported beside it. The decision and its evidence go into
the materialization.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

MATRIX = {  # (large data, similar domain) -> strategy
    (False, True): "head",
    (False, False): "top_layers",
    (True, True): "top_layers",
    (True, False): "full",
}


@dataclass(frozen=True)
class StrategyDecision:
    strategy: str
    large_data: bool
    similar_domain: bool
    examples_per_class: float  # median over classes
    min_examples_per_class: int
    n_classes: int
    domain_distance: float
    large_data_per_class: int
    similar_distance: float
    reference: str  # what the reference sample was
    mmd2: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.strategy}: {'large' if self.large_data else 'small'} data ({self.examples_per_class:g} "
                f"examples per class, threshold {self.large_data_per_class}) x "
                f"{'similar' if self.similar_domain else 'dissimilar'} domain (distance {self.domain_distance:.3f}, "
                f"threshold {self.similar_distance})")


def matrix(large_data: bool, similar_domain: bool) -> str:
    return MATRIX[(large_data, similar_domain)]


def mean_embedding_distance(a: Any, b: Any) -> float:
    """1 - cosine similarity of the two samples' mean (normalized) embeddings: 0 same direction, up to 2."""
    import numpy as np

    ma, mb = np.asarray(a, dtype=np.float64).mean(axis=0), np.asarray(b, dtype=np.float64).mean(axis=0)
    denom = float(np.linalg.norm(ma) * np.linalg.norm(mb))
    return 1.0 - (float(ma @ mb) / denom if denom else 0.0)


def decide(counts: dict[str, int], task_texts: Sequence[str], reference_texts: Sequence[str], *,
           large_data_per_class: int, similar_distance: float, sample: int = 300, seed: int = 0,
           embed: Optional[Callable[[list[str]], Any]] = None, reference: str = "") -> StrategyDecision:
    """Apply the matrix to the train split's class counts and the task/reference embedding distance."""
    if not counts:
        raise ValueError("strategy auto: the train split has no labelled rows")
    if not reference_texts:
        raise ValueError("strategy auto: the reference sample is empty (set classifier.reference_corpus)")
    rng = random.Random(seed)
    task = rng.sample(list(task_texts), min(sample, len(task_texts)))
    ref = rng.sample(list(reference_texts), min(sample, len(reference_texts)))
    if embed is None:
        from tuneline.monitoring.drift import default_embedder

        embed = default_embedder()
    a, b = _vectors(embed, task), _vectors(embed, ref)
    distance = mean_embedding_distance(a, b)
    mmd2 = _mmd2(a, b)
    per_class = statistics.median(counts.values())
    large, similar = per_class >= large_data_per_class, distance < similar_distance
    return StrategyDecision(strategy=matrix(large, similar), large_data=large, similar_domain=similar,
                            examples_per_class=float(per_class), min_examples_per_class=min(counts.values()),
                            n_classes=len(counts), domain_distance=round(distance, 4),
                            large_data_per_class=large_data_per_class, similar_distance=similar_distance,
                            reference=reference, mmd2=mmd2)


def _vectors(embed: Any, texts: list[str]) -> Any:
    import numpy as np

    vectors = embed.encode(texts) if hasattr(embed, "encode") else embed(texts)
    return np.asarray(vectors, dtype=np.float64)


def _mmd2(a: Any, b: Any) -> Optional[float]:
    """The drift monitor's unbiased MMD² (RBF kernel, median bandwidth) between the two samples, for the record."""
    from tuneline.monitoring.drift import _relabellings, mmd_permutation_test

    if len(a) < 2 or len(b) < 2:
        return None
    observed, _, _ = mmd_permutation_test(a, b, _relabellings(len(a), len(b), 1, 0))
    return round(observed, 5)
