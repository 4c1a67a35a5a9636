"""The hot path without Beam: `transforms.inference` imports and runs with no apache_beam."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

_NO_BEAM = """
import json, sys
sys.modules["apache_beam"] = None  # any import of apache_beam now raises ImportError
from transforms.inference import TaskBinding, load_task
from transforms.models import resolve_model
from transforms.tasks.text_classification import TextClassification

adapter = TextClassification("sentiment")
task = TaskBinding(adapter, resolve_model(sys.argv[1]), device="cpu")
loaded = load_task(task)
inputs = adapter.row_inputs({"text": ["A fine day.", None, "Rain again."]})
results, errors, truncated = loaded.run(inputs, 2048)
loaded_beam = [name for name in sys.modules if name.split(".")[0] == "apache_beam"]
print(json.dumps({"results": results, "errors": errors, "beam": loaded_beam}))
"""


def test_hot_path_runs_without_apache_beam(tiny_models):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _NO_BEAM, str(tiny_models["text-classification"])],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["beam"] == ["apache_beam"]  # only the blocked placeholder
    assert out["errors"][1].startswith("InvalidInput")
    assert out["errors"][0] is None and out["errors"][2] is None
    assert all(isinstance(label, str) for label, _ in (out["results"][0], out["results"][2]))
