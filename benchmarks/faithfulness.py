"""Faithfulness of summaries: does a summary name things or numbers that its source never mentions?

A heuristic, not a fact checker. For each summary of a source passage:
  entities  runs of Capitalised Words (with "of", "de", "van"... allowed inside a run) that do not start
            the sentence; the sentence's first word is dropped from a run ("Lena Marsh opened" -> "Marsh").
            Supported when every word of it occurs in the source (case-insensitive).
  numbers   digit strings ("4.2", "6,500" -> 6500); supported when the source has the same value, in
            digits or as a number word up to ninety ("seven" supports 7).
  novel n-grams  the share of the summary's word 1-, 2- and 3-grams absent from the source: how abstractive
            it is, which is not wrong in itself.
A summary is flagged when it has an unsupported entity or number. What it misses: wrong facts built from
the source's own words ("the council voted 2 to 7"), entities at the start of a sentence that are one
word long, lower-case inventions ("a nurse" -> "a doctor"), number words in the summary, paraphrased
quantities ("a third" vs "33%" is flagged). See benchmarks/README.md.
"""

import json
import re
from pathlib import Path

SOURCES = Path(__file__).parent / "data" / "faithfulness_sources.jsonl"
PROMPT = "Summarise the following text in two or three sentences.\n\n{source}"

CONNECTORS = {"of", "de", "la", "le", "van", "von", "da", "del", "du", "der", "al"}
CAPITALISED = re.compile(r"^[A-Z][\w'’\-]*$")
TOKEN = re.compile(r"[A-Za-z][\w'’\-]*|\d[\d,.]*")
SENTENCE = re.compile(r"(?<=[.!?])[\"'’”)]*\s+")
NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")
WORD = re.compile(r"[a-z0-9]+(?:['’][a-z]+)*")
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
NUMBER_WORDS.update({w: 10 * i for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), 3)})


def load_sources(path: Path = SOURCES) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def entities(text: str) -> list[str]:
    """Capitalised word runs not at a sentence start (see the module docstring)."""
    found = []
    for sentence in SENTENCE.split(text):
        tokens = TOKEN.findall(sentence)
        run = []
        for i, tok in enumerate(tokens + [""]):
            if CAPITALISED.match(tok) and tok != "I":
                if i == 0:
                    continue  # the sentence's first word is capitalised anyway
                run.append(tok)
            elif tok in CONNECTORS and run and i + 1 < len(tokens) and CAPITALISED.match(tokens[i + 1]):
                run.append(tok)
            else:
                if run:
                    found.append(" ".join(run))
                run = []
    return found


def numbers(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in NUMBER.findall(text)]


def _ngrams(words: list[str], n: int) -> list[tuple]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def check(source: str, summary: str) -> dict:
    """Unsupported entities and numbers in one summary, and its novel n-gram rates."""
    src_words = WORD.findall(source.lower())
    vocab = set(src_words)
    src_numbers = set(numbers(source)) | {float(NUMBER_WORDS[w]) for w in src_words if w in NUMBER_WORDS}
    bad_entities = [e for e in entities(summary)
                    if not all(w in vocab for w in WORD.findall(e.lower()) if w not in CONNECTORS)]
    bad_numbers = [n for n in numbers(summary) if n not in src_numbers]
    words = WORD.findall(summary.lower())
    novel = {}
    for n in (1, 2, 3):
        grams = _ngrams(words, n)
        have = set(_ngrams(src_words, n))
        novel[f"novel_{n}gram"] = sum(g not in have for g in grams) / len(grams) if grams else 0.0
    return {
        "unsupported_entities": bad_entities,
        "unsupported_numbers": [int(n) if n.is_integer() else n for n in bad_numbers],
        "flagged": bool(bad_entities or bad_numbers),
        "words": len(words),
        **novel,
    }


def _share(k: int, n: int) -> dict:
    """A proportion with its exact (Clopper-Pearson) 95% interval."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    return {"share": k / n, "count": k, "of": n, "ci95": [float(ci.low), float(ci.high)]}


def faithfulness_report(sources: list[dict], summaries: dict[str, list[str]]) -> dict:
    """Per model: flagged share (any unsupported entity/number), each kind's share, mean novel n-gram rates."""
    models = {}
    for name, outs in summaries.items():
        if len(outs) != len(sources):
            raise ValueError(f"{name}: {len(outs)} summaries for {len(sources)} sources")
        items = [{"id": s.get("id", str(i)), **check(s["source"], out)} for i, (s, out) in enumerate(zip(sources, outs))]
        n = len(items)
        models[name] = {
            "flagged": _share(sum(it["flagged"] for it in items), n),
            "unsupported_entity": _share(sum(bool(it["unsupported_entities"]) for it in items), n),
            "unsupported_number": _share(sum(bool(it["unsupported_numbers"]) for it in items), n),
            **{k: sum(it[k] for it in items) / n for k in ("novel_1gram", "novel_2gram", "novel_3gram")},
            "mean_words": sum(it["words"] for it in items) / n,
            "per_item": items,
        }
    return {"models": models, "sources": len(sources),
            "method": "heuristic: capitalised runs and digits absent from the source; see benchmarks/README.md"}


def prompts(sources: list[dict]) -> list[list[dict]]:
    return [[{"role": "user", "content": PROMPT.format(source=s["source"])}] for s in sources]
