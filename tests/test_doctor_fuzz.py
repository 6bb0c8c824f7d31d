"""Fuzz `loft doctor` with broken files: random byte flips, truncations, lost and doubled lines of the real demo
recipe and its real Shakespeare rows. Whatever the damage, the doctor must answer with findings and an exit code
in {0, 1, 2} — never a traceback, never a crash of one of its own checks (LOFT-X001).
"""

import json
import random
import subprocess
import sys

import pytest
import yaml

from training import doctor
from training.paths import REPO, apply_private_env

apply_private_env()

DEMO = REPO / "recipes" / "smollm2-135m" / "lora-cpu.yaml"
CASES = 20  # per file kind: 40 in all


def mutate(raw: bytes, rng: random.Random) -> bytes:
    data = bytearray(raw)
    kind = rng.choice(["flip", "flip", "truncate", "drop-line", "double-line", "splice"])
    if kind == "flip":
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "truncate":
        del data[rng.randrange(len(data)):]
    elif kind in ("drop-line", "double-line"):
        lines = bytes(data).split(b"\n")
        i = rng.randrange(len(lines))
        lines[i:i + 1] = [] if kind == "drop-line" else [lines[i], lines[i]]
        data = bytearray(b"\n".join(lines))
    else:  # a chunk of the file pasted somewhere else
        a = rng.randrange(len(data))
        chunk = data[a:a + rng.randint(1, 40)]
        b = rng.randrange(len(data))
        data[b:b] = chunk
    return bytes(data)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean recipe on 100 real rows (kept small so 40 runs stay fast)."""
    from training.demo import ensure_demo_data

    src = ensure_demo_data()
    out = tmp_path_factory.mktemp("fuzz")
    rows = (src / "train.jsonl").read_bytes().split(b"\n")[:100]
    (out / "train.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["datasets"][0]["path"] = str(out / "train.jsonl")
    cfg["test_datasets"][0]["path"] = str(src / "eval.jsonl")
    cfg["max_steps"] = 25
    (out / "recipe.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def run_doctor(path, capfd) -> tuple[int, dict]:
    capfd.readouterr()
    code = doctor.main([str(path), "--json"])
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    report = json.loads(out)
    assert code in (0, 1, 2) and report["exit_code"] == code
    crashed = [f["reason"] for f in report["findings"] if f["code"] == "LOFT-X001"]
    assert not crashed, crashed
    return code, report


@pytest.mark.parametrize("seed", range(CASES))
def test_fuzzed_recipe(seed, clean, tmp_path, capfd):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(mutate((clean / "recipe.yaml").read_bytes(), random.Random(seed)))
    run_doctor(path, capfd)


@pytest.mark.parametrize("seed", range(CASES))
def test_fuzzed_dataset(seed, clean, tmp_path, capfd):
    data = tmp_path / "train.jsonl"
    data.write_bytes(mutate((clean / "train.jsonl").read_bytes(), random.Random(1000 + seed)))
    path = tmp_path / "recipe.yaml"
    path.write_text((clean / "recipe.yaml").read_text().replace(str(clean / "train.jsonl"), str(data)))
    code, report = run_doctor(path, capfd)
    if data.read_bytes() != (clean / "train.jsonl").read_bytes() and code == 0:
        # damage the doctor let through must still be valid JSON lines of conversations
        for line in data.read_text(encoding="utf-8").splitlines():
            if line.strip():
                assert isinstance(json.loads(line).get("messages"), list)


def test_binary_recipe_through_the_real_command(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(bytes(random.Random(7).randrange(256) for _ in range(2000)))
    proc = subprocess.run([sys.executable, "-m", "training.doctor", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "LOFT-E001" in proc.stdout
