"""Hub model ids resolve through the real huggingface_hub cache, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq

from tests.conftest import REPO, SAMPLE_DATA, fake_hub_cache

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_hub_id_resolves_to_the_cached_commit(tmp_path, tiny_models):
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "acme/tiny-sentiment", tiny_models["text-classification"], COMMIT)
    spec = tmp_path / "job.yaml"
    spec.write_text(
        json.dumps(
            {
                "tasks": [
                    {"name": "s", "task": "sentiment-analysis", "model": "acme/tiny-sentiment"},
                    {"name": "t", "task": "sentiment-analysis", "model": "acme/not-cached"},
                ]
            }
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    command = [
        sys.executable,
        "-m",
        "pipelines.enrich",
        "--input",
        str(SAMPLE_DATA / "reviews.parquet"),
        "--output",
        str(tmp_path / "out"),
        "--spec",
        str(spec),
    ]
    failed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert failed.returncode == 2
    assert "'acme/not-cached'" in failed.stderr and "not in the local cache" in failed.stderr
    assert "Traceback" not in failed.stderr

    spec.write_text(
        json.dumps(
            {
                "tasks": [
                    {"name": "s", "task": "sentiment-analysis", "model": "acme/tiny-sentiment"},
                ]
            }
        )
    )
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (task,) = manifest["tasks"]
    assert (task["model"], task["model_source"]) == ("acme/tiny-sentiment", "hub")
    assert (task["requested_revision"], task["resolved_revision"]) == ("main", COMMIT)
    table = pq.read_table(next((tmp_path / "out").glob("part-*.parquet")))
    assert set(table.column("s_label").to_pylist()) <= {"POSITIVE", "NEGATIVE"}


def test_a_chat_prompt_on_a_hub_model_without_a_chat_template_exits_2_before_the_run(
    tmp_path, tiny_models
):
    """The launcher reads the pinned commit's tokenizer files (here from the cache)."""
    plain = tiny_models["text-generation"]
    instruct = tmp_path / "instruct"
    shutil.copytree(plain, instruct)
    (instruct / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "acme/plain-lm", plain, COMMIT)
    fake_hub_cache(cache, "acme/instruct-lm", instruct, COMMIT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    results = {}
    for repo in ("acme/plain-lm", "acme/instruct-lm"):
        spec = tmp_path / f"{repo.split('/')[1]}.yaml"
        task = {"name": "g", "task": "text-generation", "model": repo}
        task["params"] = {"system": "Be brief.", "max_new_tokens": 4}
        spec.write_text(json.dumps({"tasks": [task]}))
        command = [sys.executable, "-m", "pipelines.cli", "validate", "--spec", str(spec)]
        command += ["--input", str(SAMPLE_DATA / "reviews.csv")]
        results[repo] = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    refused = results["acme/plain-lm"]
    assert refused.returncode == 2, refused.stderr
    assert "has no chat template" in refused.stderr and "Traceback" not in refused.stderr
    assert results["acme/instruct-lm"].returncode == 0, results["acme/instruct-lm"].stderr
