"""Faithfulness heuristic on fixed inputs whose answers are known by reading them."""

import json

import pytest

from benchmarks import faithfulness as f
from training.cli import main

SOURCE = ("The town council of Eastmere voted 7 to 2 on Tuesday to replace the Harbour Street footbridge. "
          "The new bridge will cost 4.2 million pounds. Councillor Ruth Okafor said work starts in four weeks.")


def test_entities_skip_sentence_starts_and_keep_connectors():
    text = "Lena Marsh met the University of Tromsdal team. Then Anders Vik flew to Paris. I agreed."
    assert f.entities(text) == ["Marsh", "University of Tromsdal", "Anders Vik", "Paris"]


def test_faithful_summary_is_not_flagged():
    summary = ("Eastmere's council voted 7 to 2 to replace the Harbour Street footbridge for 4.2 million pounds. "
               "Work starts in 4 weeks, said Ruth Okafor.")
    result = f.check(SOURCE, summary)
    assert result["unsupported_entities"] == [] and result["unsupported_numbers"] == []  # "4" <- "four"
    assert result["flagged"] is False


def test_invented_name_and_number_are_flagged():
    result = f.check(SOURCE, "The council, led by Mayor John Smith, will spend 5 million pounds on a bridge.")
    assert result["unsupported_entities"] == ["Mayor John Smith"]
    assert result["unsupported_numbers"] == [5]
    assert result["flagged"] is True
    assert f.check(SOURCE, "About 6,500 people voted.")["unsupported_numbers"] == [6500]


def test_novel_ngram_rates_by_hand():
    source = "the cat sat on the mat"
    assert f.check(source, "the cat sat on the mat")["novel_3gram"] == 0.0
    r = f.check(source, "the dog sat on the mat")  # bigrams: the-dog, dog-sat new of 5; trigrams 2 of 4 new
    assert r["novel_1gram"] == pytest.approx(1 / 6)
    assert r["novel_2gram"] == pytest.approx(2 / 5)
    assert r["novel_3gram"] == pytest.approx(2 / 4)


def test_shipped_sources_extractive_summaries_pass_and_inventions_fail():
    sources = f.load_sources()
    assert len(sources) == 10 and len({s["id"] for s in sources}) == 10
    first_sentences = [s["source"].split(". ")[0] + "." for s in sources]
    invented = [t + " Officials in Brussels counted 917 visitors." for t in first_sentences]
    report = f.faithfulness_report(sources, {"extractive": first_sentences, "inventive": invented})
    good, bad = report["models"]["extractive"], report["models"]["inventive"]
    assert good["flagged"]["count"] == 0 and good["novel_3gram"] == 0.0
    assert bad["flagged"]["count"] == 10
    assert all(it["unsupported_entities"] == ["Brussels"] and it["unsupported_numbers"] == [917]
               for it in bad["per_item"])
    lo, hi = good["flagged"]["ci95"]
    assert lo == 0.0 and 0.2 < hi < 0.4  # exact 95% upper bound for 0/10 is 1 - 0.025**(1/10) = 0.308
    assert hi == pytest.approx(1 - 0.025 ** (1 / 10))


def test_cli_scores_saved_summaries(tmp_path, capsys):
    sources = f.load_sources()
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"output": s["source"]}) + "\n" for s in sources))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"output": "Nothing happened, said Zorblax, 917 times."}) + "\n"
                                              for s in sources))
    run = tmp_path / "run"
    assert main(["bench", "faithfulness", "--model", f"base={tmp_path / 'a.jsonl'}",
                 "--model", f"other={tmp_path / 'b.jsonl'}", "--run", str(run)]) == 0
    models = json.loads((run / "faithfulness.json").read_text())["models"]
    assert models["base"]["flagged"]["share"] == 0.0 and models["other"]["flagged"]["share"] == 1.0

    (tmp_path / "short.jsonl").write_text(json.dumps({"output": "x"}) + "\n")
    capsys.readouterr()
    rc = main(["bench", "faithfulness", "--model", f"base={tmp_path / 'short.jsonl'}", "--run", str(run)])
    err = capsys.readouterr().err
    assert rc != 0 and "at least 10 JSON lines" in err and "Traceback" not in err
