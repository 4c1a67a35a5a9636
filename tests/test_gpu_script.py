"""benchmarks/gpu.py runs where apache_beam cannot be imported (the GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# apache_beam set to None in sys.modules: any import of it raises ImportError.
_RUN_WITHOUT_BEAM = """
import runpy, sys
sys.modules["apache_beam"] = None
sys.argv = ["gpu.py", *sys.argv[1:]]
runpy.run_path("benchmarks/gpu.py", run_name="__main__")
"""


def test_gpu_benchmark_runs_without_beam_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--tiny", "--tasks", "sentiment,gpt2", "--dtypes", "fp32"]
    done = subprocess.run(
        [sys.executable, "-c", _RUN_WITHOUT_BEAM, *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["machine"]["apache_beam_importable"] is False
    settings = results["settings"]
    sentiment = results["tasks"]["sentiment"]["fp32"]
    for method in ("hot_path", "bare", "pipeline"):
        assert sentiment[method]["rows_per_s"] > 0
    assert sentiment["hot_path"]["failed_rows"] == 0
    # Same model, same rows, fp32: the hot path labels as the bare forward pass does.
    assert sentiment["hot_path"]["labels_equal_to_bare"] >= 0.9
    gpt2 = results["tasks"]["gpt2"]["fp32"]
    assert gpt2["hot_path"]["failed_rows"] == 0
    # No end-of-sequence token: every prompt generated all its new tokens.
    assert gpt2["bare"]["new_tokens_counted"] == settings["gen_rows"] * settings["new_tokens"]
    assert gpt2["hot_path"]["new_tokens_per_s"] > 0
