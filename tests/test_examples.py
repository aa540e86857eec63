"""The examples run (at a tiny size), so they cannot rot."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_library_api_example_runs_end_to_end(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "library_api.py"), "--workdir", str(tmp_path), "--tiny"],
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    for mode in ("masked", "crop", "blackout"):
        assert f"{mode}: k-NN top-1" in completed.stdout
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
