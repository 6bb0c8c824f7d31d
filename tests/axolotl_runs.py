"""Several real Axolotl trainings one after another in one fresh Python process, each with its own log.

Each `accelerate launch -m axolotl.cli.train` pays ~25 s of CPU for importing torch, accelerate and Axolotl
before its first step, more than a 2-step run on a tiny model costs. Tests that train many small configs run
them here through axolotl.cli.train.do_cli (the function that launcher calls), so the imports are paid once.
The launcher itself is run for real by `loft train` in tests/test_kill.py, tests/test_pipeline.py,
tests/test_multigpu.py and the guard's clean run.
"""

import subprocess
import sys
from pathlib import Path

from training.launcher import environment
from training.paths import REPO

RUNNER = '''
import os
import sys
import traceback

if __name__ == "__main__":  # datasets may spawn workers that re-import this file
    from axolotl.cli.train import do_cli

    for config, log in zip(sys.argv[1::2], sys.argv[2::2]):
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(log, "w") as fh:  # everything the run prints, Python or not, goes to its own log
            os.dup2(fh.fileno(), 1), os.dup2(fh.fileno(), 2)
            try:
                do_cli(config=config)
            except BaseException:  # the next run still gets its turn; the test reads this one's log
                traceback.print_exc()
                print(f"RUN FAILED {config}", flush=True)
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        print(f"done {config}", flush=True)
'''


def train_all(runs: list[tuple[Path, Path]], work: Path, timeout: int = 1800) -> str:
    """Train each (resolved config, log path) in order in one new process; returns the process's own output."""
    runner = work / "axolotl_runner.py"
    runner.write_text(RUNNER)
    argv = [str(p) for pair in runs for p in pair]
    proc = subprocess.run([sys.executable, str(runner), *argv], cwd=REPO, env=environment(), capture_output=True,
                          text=True, timeout=timeout)
    return proc.stdout + proc.stderr
