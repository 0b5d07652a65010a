"""The scripts in examples/ run as written, with their tiny CPU defaults (each in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# script -> lines its output must contain
CASES = {
    "kw_resnet18_train.py": ["step 0: loss", "tau", "done: 3 steps"],
    "pbconv_search_deploy.py": ["search: 2 candidates", "convert('pbconv')", "check_equivalence", "equivalent: OK"],
    "parcnetv2_train_export.py": ["step 0: loss", "reparameterize('auto')", "torch.export:", "export: OK"],
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("REPKERNELS_BACKEND", None)
    proc = subprocess.run([sys.executable, str(EXAMPLES / script)], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{out[-4000:]}"
    for line in CASES[script]:
        assert line in proc.stdout, f"{script}: {line!r} not in its output:\n{out[-4000:]}"
