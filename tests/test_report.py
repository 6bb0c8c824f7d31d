"""`loft report` renders every saved result of a run folder: numbers, tables and real PNGs, in md and html."""

import json
import re

import pytest

from benchmarks import faithfulness, report, style, versus
from training.cli import main
from training.paths import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN_LOSS = [4.3 - 0.05 * step for step in range(1, 21)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as training and the benchmarks leave it, results computed by the real functions."""
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path_factory.mktemp("run")
    writer = SummaryWriter(log_dir=str(run / "adapter" / "runs" / "Nov22_run"))
    for step, loss in enumerate(TRAIN_LOSS, 1):
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/learning_rate", 1e-4, step)
    writer.add_scalar("eval/loss", 4.5, 0)
    writer.add_scalar("eval/loss", 3.25, 20)
    writer.close()

    verse = ["HAMLET\nO, that this too too solid flesh would melt,\nThaw and resolve itself into a dew!",
             "OPHELIA\nGood my lord,\nHow does your honour for this many a day?",
             "HORATIO\nHail to your lordship!\nThe same, my lord, and your poor servant ever.",
             "MARCELLUS\nSomething is rotten in the state of Denmark.\nHeaven will direct it."] * 3
    prose = ["The function returns a list of values. Each value is checked | before use.",
             "Install the package with pip, then run the tests to confirm it works as expected.",
             "A list is a mutable sequence, usually used to store collections of items.",
             "The result is cached on disk so that a second call returns at once."] * 3
    result = style.style_report(verse, {"base": prose, "fine-tuned": verse[::-1]}, n_boot=30)
    result["samples"] = style.voice_table(["Continue: a|b"] * 2, {"base": prose, "fine-tuned": verse}, verse, n=2)
    (run / RunDir.STYLE_JSON).write_text(json.dumps(result))

    items = versus.math_problems(6)
    outs = {"fine-tuned": [str(i["answer"]) for i in items], "base": ["0"] * 3 + [str(i["answer"]) for i in items[3:]]}
    (run / RunDir.VERSUS_JSON).write_text(json.dumps({"tasks": {"math": versus.head_to_head(
        "math", items, outs, "fine-tuned", "base")}}))

    sources = faithfulness.load_sources()[:3]
    (run / RunDir.FAITHFULNESS_JSON).write_text(json.dumps(faithfulness.faithfulness_report(
        sources, {"base": [s["source"] for s in sources], "fine-tuned": ["Said Zed, 99."] * 3})))
    (run / RunDir.MERGE_JSON).write_text(json.dumps(
        {"dtype": "bf16", "verification": {"passed": True, "top1_agreement": 0.9871, "kl_mean": 0.00123}}))
    (run / RunDir.EXPORT_JSON).write_text(json.dumps({"eval": {"text": "held-out Hamlet"}, "files": [
        {"quant": "F16", "file": "m-F16.gguf", "bytes": 270_000_000, "ppl": 21.5, "ppl_vs_f16": 0.0},
        {"quant": "Q8_0", "file": "m-Q8_0.gguf", "bytes": 145_000_000, "ppl": 21.61, "ppl_vs_f16": 0.00512}]}))
    (run / RunDir.PIPELINE_JSON).write_text(json.dumps({"train": 241.5, "export": 33.0}))
    return run


@pytest.fixture(scope="module")
def rendered(run_dir):
    path = report.render(run_dir)
    return path.read_text(), (run_dir / RunDir.REPORT_HTML).read_text()


def test_report_shows_the_saved_numbers(run_dir, rendered):
    md, _ = rendered
    assert f"{TRAIN_LOSS[0]:.4f}" in md and f"{TRAIN_LOSS[-1]:.4f}" in md  # first and last train loss
    assert "4.5000" in md and "3.2500" in md  # eval loss
    assert "learning_rate" not in md  # only loss curves are drawn
    s = json.loads((run_dir / RunDir.STYLE_JSON).read_text())["scores"]["fine-tuned"]
    assert f"{s['score']:.1f}" in md and f"[{s['ci95'][0]:.1f}, {s['ci95'][1]:.1f}]" in md
    v = json.loads((run_dir / RunDir.VERSUS_JSON).read_text())["tasks"]["math"]
    assert (v["wins"], v["ties"], v["losses"]) == (3, 3, 0)
    assert f"| math | fine-tuned | base | 6 | 3 | 3 | 0 | 50% |" in md and f"{v['p_value']:.3g}" in md
    assert "| fine-tuned | 100% (3/3) |" in md and "| base | 0% (0/3) |" in md  # faithfulness
    assert "0.9871" in md and "0.00123" in md  # merge fidelity
    assert "257.5 MiB" in md and "+0.51%" in md  # export sizes and perplexity change
    assert "| train | 241.5 |" in md


def test_voice_table_keeps_lines_and_escapes_pipes(rendered):
    md, _ = rendered
    assert "O, that this too too solid flesh would melt,<br>Thaw" in md
    assert "Continue: a&#124;b" in md and "checked &#124; before" in md


def test_pngs_are_linked_real_and_inlined_in_html(run_dir, rendered):
    md, page = rendered
    links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert len(links) == 4  # loss, style, versus, faithfulness
    for link in links:
        data = (run_dir / link).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert page.count('src="data:image/png;base64,') == 4 and ".png\"" not in page
    assert "<table>" in page and "0.9871" in page


def test_regenerating_gives_the_same_report(run_dir, rendered):
    assert report.render(run_dir).read_text() == rendered[0]


def test_cli_refuses_a_folder_with_nothing_to_report(tmp_path, capsys):
    rc = main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc != 0 and "nothing to report" in err and "Traceback" not in err and err.count("\n") == 1
    (tmp_path / RunDir.STYLE_JSON).write_text("{not json")
    assert main(["report", str(tmp_path)]) != 0
    assert "is not valid JSON" in capsys.readouterr().err


def test_html_renders_in_chromium_with_every_plot_loaded(run_dir, rendered):
    """The page a user opens: Chromium (headless, fresh profile) decodes every inlined plot."""
    import chromium

    if chromium.executable() is None:
        pytest.fail("Chromium is not installed; `make setup-serve` installs it (apt-get install chromium)")
    browser = chromium.Browser()
    try:
        browser.goto((run_dir / RunDir.REPORT_HTML).as_uri())
        images = browser.wait_for("Array.from(document.images).every(i => i.complete) && "
                                  "Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight])")
        assert len(images) == 4 and all(w > 100 and h > 100 for w, h in images), images
        assert browser.js("document.querySelectorAll('table').length") >= 3
        assert "0.9871" in browser.js("document.body.innerText")
    finally:
        browser.close()
