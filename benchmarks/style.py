"""Style transfer: how much closer to the author's voice a fine-tune writes than its base model.

Every model answers the same held-out prompts; the author's real continuations are the reference. Five
distances between a model's outputs and the reference, each measured on whole groups of texts:

  vocabulary   cosine_delta   Cosine Delta (Evert et al. 2017) on z-scored most-frequent-word profiles
               mfw_overlap    1 - |top-50 words of the model ∩ top-50 of the reference| / 50
               (burrows_delta, Burrows 2002, is reported too; it ranks like Cosine Delta, so it is not
               counted twice in the score)
  structure    sentence_length  Wasserstein-1 between sentence-length distributions (words per sentence)
               punctuation      Jensen-Shannon distance between token-type distributions (word , . ; : ! ? ...)
               line_length      Wasserstein-1 between line-length distributions (words per line: verse vs prose)

Calibration: the reference is split into two halves A and B, and so is every model's output list (same
seeded permutation, so prompts stay aligned when the lists are). Each half is scored against the other
half of the reference (target), and the two folds averaged, so a model and the author's own second half
are judged on equal amounts of text that the target never contains:

  r_c(x)  = d_c(x) / d_c(base)                      a component's distance relative to the base model
  D(x)    = ½·mean(r over vocabulary) + ½·mean(r over structure)
  score   = 100 · (1 - D(x)) / (1 - D(author))      where "author" is reference half B against half A

So the base model scores 0 by construction and a second sample of the author's own text scores 100.
Scores are not clipped: below 0 is further from the author than the base model, above 100 is closer
to the target half than the author's other half is (sampling noise, or copying). 95% intervals are
percentile bootstraps over prompts (resampled within each half, paired across models). The full
definitions, with references, are in benchmarks/README.md.
"""

import re
from collections import Counter

import numpy as np

N_MFW = 100  # features for the Deltas; short samples make rarer words noise (Evert et al. use 100-5000)
TOP_OVERLAP = 50
N_BOOT = 1000
PUNCT = [",", ".", ";", ":", "!", "?", "'", '"', "-", "(", ")"]
COMPONENTS = {
    "vocabulary": ["cosine_delta", "mfw_overlap"],
    "structure": ["sentence_length", "punctuation", "line_length"],
}
REPORTED_ONLY = ["burrows_delta"]

WORD = re.compile(r"[a-z]+(?:['’][a-z]+)*")
SENTENCE_END = re.compile(r"[.!?]+[\"'’”)\]]*(?=\s|$)")


# ---------------------------------------------------------------- one text -> features
def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def sentence_lengths(text: str) -> list[int]:
    """Words per sentence; a trailing fragment without a full stop counts as a sentence too."""
    return [n for n in (len(words(s)) for s in SENTENCE_END.split(text)) if n]


def line_lengths(text: str) -> list[int]:
    return [n for n in (len(words(line)) for line in text.splitlines()) if n]


def punct_counts(text: str) -> np.ndarray:
    """Counts of [words, then each mark in PUNCT]; '--' and '—' count as a dash."""
    text = text.replace("—", "-").replace("--", "-").replace("’", "'").replace("“", '"').replace("”", '"')
    stripped = WORD.sub(" ", text.lower())  # apostrophes inside words (o'er) are not punctuation
    return np.array([len(words(text))] + [stripped.count(p) for p in PUNCT], dtype=float)


class Group:
    """One model's outputs (or the reference) as arrays the bootstrap can resample cheaply."""

    def __init__(self, texts: list[str]):
        self.texts = texts
        self.tokens = [words(t) for t in texts]
        self.sentences = [sentence_lengths(t) for t in texts]
        self.lines = [line_lengths(t) for t in texts]
        self.punct = np.array([punct_counts(t) for t in texts]).reshape(len(texts), len(PUNCT) + 1)

    def counts(self, vocab: dict[str, int]) -> np.ndarray:
        out = np.zeros((len(self.texts), len(vocab)))
        for i, toks in enumerate(self.tokens):
            for w, c in Counter(toks).items():
                if w in vocab:
                    out[i, vocab[w]] = c
        return out


# ---------------------------------------------------------------- distances between two sets of samples
def _profile(counts: np.ndarray, idx: np.ndarray) -> np.ndarray:
    total = counts[idx].sum(0)
    return total / max(total.sum(), 1.0)


def _concat(lists: list[list[int]], idx: np.ndarray) -> np.ndarray:
    values = [v for i in idx for v in lists[i]]
    return np.array(values or [0], dtype=float)


class Space:
    """The shared feature space: MFW list and z-scaling from every sample of every group (Burrows 2002)."""

    def __init__(self, groups: dict[str, Group]):
        # Rank words by their mean relative frequency over groups, so no group dominates by sheer length.
        freq = Counter()
        for g in groups.values():
            n = sum(len(t) for t in g.tokens) or 1
            for w, c in Counter(w for t in g.tokens for w in t).items():
                freq[w] += c / n
        self.mfw = [w for w, _ in freq.most_common(N_MFW)]
        # The overlap needs each group's own top words; every group's top 4×K words keeps those exact.
        extra = set()
        for g in groups.values():
            extra |= {w for w, _ in Counter(w for t in g.tokens for w in t).most_common(4 * TOP_OVERLAP)}
        self.vocab = {w: i for i, w in enumerate(self.mfw + sorted(extra - set(self.mfw)))}
        self.counts = {name: g.counts(self.vocab) for name, g in groups.items()}
        rel = []
        for name, g in groups.items():
            n = np.array([len(t) for t in g.tokens], dtype=float)
            keep = n > 0
            rel.append(self.counts[name][keep, :N_MFW] / n[keep, None])
        rel = np.vstack(rel)
        self.mean = rel.mean(0)
        self.std = np.maximum(rel.std(0), 1e-9)

    def distances(self, ga: Group, a: str, ia: np.ndarray, gb: Group, b: str, ib: np.ndarray) -> dict:
        pa, pb = _profile(self.counts[a], ia), _profile(self.counts[b], ib)
        za, zb = (pa[:N_MFW] - self.mean) / self.std, (pb[:N_MFW] - self.mean) / self.std
        cos = za @ zb / max(np.linalg.norm(za) * np.linalg.norm(zb), 1e-12)
        top_a = {i for i in np.argsort(-pa)[:TOP_OVERLAP] if pa[i] > 0}  # a word never used is no top word
        top_b = {i for i in np.argsort(-pb)[:TOP_OVERLAP] if pb[i] > 0}
        return {
            "cosine_delta": float(1 - cos),
            "burrows_delta": float(np.abs(za - zb).mean()),
            "mfw_overlap": 1 - len(top_a & top_b) / TOP_OVERLAP,
            "sentence_length": _wasserstein(_concat(ga.sentences, ia), _concat(gb.sentences, ib)),
            "punctuation": _jensen_shannon(ga.punct[ia].sum(0), gb.punct[ib].sum(0)),
            "line_length": _wasserstein(_concat(ga.lines, ia), _concat(gb.lines, ib)),
        }


def _wasserstein(u: np.ndarray, v: np.ndarray) -> float:
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(u, v))


def _jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    from scipy.spatial.distance import jensenshannon

    if p.sum() == 0 or q.sum() == 0:
        return 1.0
    return float(jensenshannon(p, q, base=2))


# ---------------------------------------------------------------- calibrated score
def _halves(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def _score(d: dict, base: dict, author: dict) -> tuple[float, dict]:
    """Overall score and per-component scores from distances to the target (see the module docstring)."""
    scale = {c: max(base[c] + author[c], 1e-12) for c in base}

    def overall_distance(x):
        return float(np.mean([np.mean([x[c] / scale[c] for c in cs]) for cs in COMPONENTS.values()]))

    gap = overall_distance(base) - overall_distance(author)
    score = 100 * (overall_distance(base) - overall_distance(d)) / gap if gap > 1e-9 else float("nan")
    per = {}
    for c in [c for cs in COMPONENTS.values() for c in cs] + REPORTED_ONLY:
        gap_c = base[c] - author[c]
        per[c] = 100 * (base[c] - d[c]) / gap_c if abs(gap_c) > 1e-12 else float("nan")
    return score, per


def style_report(
    reference: list[str], outputs: dict[str, list[str]], baseline: str = "base", seed: int = 0, n_boot: int = N_BOOT
) -> dict:
    """Score each model's outputs against the author's reference texts; see the module docstring.

    Returns {"scores": {model: {"score", "ci95", "components": {c: {"distance", "score", "ci95"}}}},
             "author": {c: distance}, "frequencies": {...}, "mfw": [...], "settings": {...}}.
    """
    if baseline not in outputs:
        raise ValueError(f"baseline {baseline!r} is not one of the outputs: {', '.join(outputs)}")
    for name, texts in {"reference": reference, **outputs}.items():
        if len(texts) < 4:
            raise ValueError(f"{name} has {len(texts)} texts; the split-half calibration needs at least 4")
        if not any(words(t) for t in texts):
            raise ValueError(f"{name} contains no words")
    groups = {"reference": Group(reference), **{name: Group(texts) for name, texts in outputs.items()}}
    space = Space(groups)
    rng = np.random.default_rng(seed)
    split = {name: _halves(len(g.texts), np.random.default_rng(seed)) for name, g in groups.items()}

    def evaluate(idx: dict) -> dict:
        """Distances of every group (and the reference's other half) to the target half, averaged over folds."""
        folds = []
        for target, other in ((0, 1), (1, 0)):
            ref, t = groups["reference"], idx["reference"][target]
            row = {"author": space.distances(ref, "reference", idx["reference"][other], ref, "reference", t)}
            for name in outputs:
                row[name] = space.distances(groups[name], name, idx[name][other], ref, "reference", t)
            folds.append(row)
        return {k: {c: (folds[0][k][c] + folds[1][k][c]) / 2 for c in folds[0][k]} for k in folds[0]}

    point = evaluate(split)
    boot = []
    for _ in range(n_boot):
        # Positions drawn once per half size, so lists of the same length (answers to the same prompts)
        # are resampled at the same prompts: the comparison stays paired.
        positions, idx = {}, {}
        for name, halves in split.items():
            for k, h in enumerate(halves):
                if (k, len(h)) not in positions:
                    positions[k, len(h)] = rng.integers(0, len(h), len(h))
            idx[name] = tuple(h[positions[k, len(h)]] for k, h in enumerate(halves))
        d = evaluate(idx)
        boot.append({name: (d[name], _score(d[name], d[baseline], d["author"])) for name in outputs})

    def ci(values) -> list[float]:
        values = np.asarray([v for v in values if np.isfinite(v)])
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else [None, None]

    def finite(x):  # JSON has no NaN: an undefined score is null
        return float(x) if np.isfinite(x) else None

    scores = {}
    for name in outputs:
        score, per = _score(point[name], point[baseline], point["author"])
        scores[name] = {
            "score": finite(score),
            "ci95": ci(b[name][1][0] for b in boot),
            "components": {
                c: {
                    "distance": point[name][c],
                    "distance_ci95": ci(b[name][0][c] for b in boot),
                    "score": finite(per[c]),
                    "ci95": ci(b[name][1][1][c] for b in boot),
                }
                for c in per
            },
        }
    return {
        "scores": scores,
        "author": point["author"],
        "frequencies": frequency_table(groups, space.mfw[:20]),
        "mfw": space.mfw,
        "settings": {
            "baseline": baseline, "seed": seed, "bootstrap": n_boot, "mfw": N_MFW, "top_overlap": TOP_OVERLAP,
            "components": COMPONENTS, "reference_texts": len(reference),
            "outputs": {name: len(texts) for name, texts in outputs.items()},
        },
    }


def frequency_table(groups: dict[str, Group], mfw: list[str]) -> dict[str, dict[str, float]]:
    """Per-1000-word rates of the most frequent words, the raw material of the Deltas, for the report."""
    table = {}
    for name, g in groups.items():
        counts = Counter(w for t in g.tokens for w in t)
        n = sum(counts.values()) or 1
        table[name] = {w: round(1000 * counts[w] / n, 2) for w in mfw}
    return table


def voice_table(prompts: list[str], outputs: dict[str, list[str]], reference: list[str], n: int = 4,
                width: int = 400) -> list[dict]:
    """The side-by-side samples for the report: prompt, each model's answer, the author's answer."""
    def cut(text: str) -> str:
        return text if len(text) <= width else text[:width].rsplit(" ", 1)[0] + " …"

    rows = []
    for i in range(min(n, len(prompts))):
        row = {"prompt": cut(prompts[i])}
        row.update({name: cut(texts[i]) for name, texts in outputs.items()})
        row["reference"] = cut(reference[i])
        rows.append(row)
    return rows
