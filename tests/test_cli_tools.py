"""Trying a spec before the run (--limit, spec-schema) and fetching models for offline workers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.cli import main
from pipelines.job import prepare_job
from pipelines.spec import parse_spec
from tests.conftest import REPO, SAMPLE_DATA, fake_hub_cache
from transforms.models import resolve_model
from transforms.tasks import ADAPTERS

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def sentiment_spec(path: Path, model: str | Path, **top) -> Path:
    spec = {
        "rows_per_chunk": 8,
        **top,
        "tasks": [{"name": "s", "task": "sentiment-analysis", "model": str(model)}],
    }
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def split_reviews(folder: Path, fmt: str, sizes: list[int]) -> list[Path]:
    """The sample reviews as consecutive files of `sizes` rows, named in input order."""
    table = pq.read_table(SAMPLE_DATA / "reviews.parquet")
    folder.mkdir()
    paths, start = [], 0
    for i, size in enumerate(sizes):
        path = folder / f"{i:02d}.{fmt}"
        part = table.slice(start, size)
        if fmt == "parquet":
            pq.write_table(part, path)
        else:
            pacsv.write_csv(part, path)
        paths.append(path)
        start += size
    return paths


# --limit


def test_limit_enriches_the_first_rows_and_never_opens_later_files(tmp_path, tiny_models):
    inputs = tmp_path / "in"
    split_reviews(inputs, "csv", [20, 30])
    # Sorted after the others: a limit within the first files must not even open it.
    (inputs / "99.csv").write_text('text,id\n"unterminated quote,1\n')
    spec = sentiment_spec(tmp_path / "job.yaml", tiny_models["text-classification"])
    output = tmp_path / "out"

    code = main(
        ["--input", str(inputs), "--output", str(output), "--spec", str(spec), "--limit", "25"]
    )

    assert code == 0
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["rows"]["limit"] == 25
    assert (manifest["rows"]["in"], manifest["rows"]["out"]) == (25, 25)
    assert [Path(entry["path"]).name for entry in manifest["inputs"]] == ["00.csv", "01.csv"]
    written = pa.concat_tables(
        pacsv.read_csv(part, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
        for part in sorted(output.glob("part-*.csv"))
    )
    expected = pacsv.read_csv(SAMPLE_DATA / "reviews.csv").column("id").to_pylist()[:25]
    assert written.column("id").to_pylist() == expected
    assert written.column("s_label").null_count == 0


def test_limit_maps_to_per_file_row_limits_from_parquet_footers(tmp_path, tiny_models):
    split_reviews(tmp_path / "in", "parquet", [30, 41])
    model = str(tiny_models["text-classification"])
    spec = parse_spec({"tasks": [{"name": "s", "task": "sentiment-analysis", "model": model}]})
    inputs = [str(tmp_path / "in")]

    def planned(limit):
        job = prepare_job(spec, inputs, str(tmp_path / "out"), limit=limit)
        return [Path(f).name for f in job.files], job.row_limits, job.context

    assert planned(30)[:2] == (["00.parquet"], {0: 30})
    assert planned(31)[:2] == (["00.parquet", "01.parquet"], {1: 1})
    assert planned(1000)[:2] == (["00.parquet", "01.parquet"], {})
    # The limit is part of the job's identity: --resume never mixes limited and full results.
    fingerprints = {planned(n)[2].fingerprint for n in (30, 31, None)}
    assert len(fingerprints) == 3
    assert planned(None)[2].limit is None and planned(31)[2].limit == 31


@pytest.mark.parametrize("value", ["0", "-3", "ten"])
def test_limit_must_be_a_positive_number(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--input", "x.csv", "--output", str(tmp_path), "--spec", "j.yaml", "--limit", value])
    assert exited.value.code == 2
    assert "--limit: expected a positive number of rows" in capsys.readouterr().err


# spec-schema


def _task_variants(schema: dict) -> dict[str, dict]:
    """Task name -> the schema of a task entry of that task."""
    items = schema["properties"]["tasks"]["items"]
    variants = {}
    for option in items.get("oneOf") or items.get("anyOf"):
        ref = option.get("$ref")
        variant = schema["$defs"][ref.rsplit("/", 1)[-1]] if ref else option
        task = variant["properties"]["task"]
        # Built-in tasks are named (const / enum); plugin tasks match a pattern.
        for name in task.get("enum") or [task.get("const")]:
            variants[name] = variant
    return variants


def test_spec_schema_lists_every_task_and_its_params(tmp_path, capsys):
    target = tmp_path / "job.schema.json"
    assert main(["spec-schema", "--output", str(target)]) == 0
    schema = json.loads(target.read_text())
    assert str(target) in capsys.readouterr().out
    assert main(["spec-schema"]) == 0
    assert json.loads(capsys.readouterr().out) == schema

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "beam-enrich job spec"
    assert schema["additionalProperties"] is False
    variants = _task_variants(schema)
    assert set(ADAPTERS) <= set(variants)
    for name, adapter in ADAPTERS.items():
        params = variants[name]["properties"]["params"]
        ref = params.get("$ref") or next(o["$ref"] for o in params["anyOf"] if "$ref" in o)
        params_schema = schema["$defs"][ref.rsplit("/", 1)[-1]]
        assert set(params_schema.get("properties", {})) == set(adapter.params_type.model_fields)
    zero_shot = variants["zero-shot-classification"]["properties"]["params"]
    assert "candidate_labels" in schema["$defs"][zero_shot["$ref"].rsplit("/", 1)[-1]]["required"]


def test_sample_specs_validate_against_the_schema():
    jsonschema = pytest.importorskip("jsonschema")
    from pipelines.cli import job_spec_schema

    validator = jsonschema.Draft202012Validator(job_spec_schema())
    validator.check_schema(validator.schema)
    for path in sorted(SAMPLE_DATA.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        assert not list(validator.iter_errors(data)), path
    bad = yaml.safe_load((SAMPLE_DATA / "job.yaml").read_text())
    bad["tasks"][0]["revison"] = "main"  # misspelt key
    assert not validator.is_valid(bad)
    bad = yaml.safe_load((SAMPLE_DATA / "job.yaml").read_text())
    bad["tasks"][1]["params"]["aggregation"] = "simple"  # not a ner parameter
    assert not validator.is_valid(bad)
    bad = yaml.safe_load((SAMPLE_DATA / "job.yaml").read_text())
    bad["tasks"][0]["dtype"] = "fp64"
    assert not validator.is_valid(bad)


# download


def test_download_offline_reports_what_the_cache_holds(tmp_path, tiny_models, capsys):
    cache = tmp_path / "cache"
    fake_hub_cache(cache, "acme/tiny-sentiment", tiny_models["text-classification"], COMMIT)
    spec = tmp_path / "job.yaml"
    spec.write_text(
        json.dumps(
            {
                "tasks": [
                    {"name": "hub", "task": "sentiment-analysis", "model": "acme/tiny-sentiment"},
                    {
                        "name": "local",
                        "task": "feature-extraction",
                        "model": str(tiny_models["feature-extraction"]),
                    },
                ]
            }
        )
    )

    assert main(["download", "--spec", str(spec), "--cache", str(cache)]) == 0

    out = capsys.readouterr().out
    snapshot = cache / "models--acme--tiny-sentiment" / "snapshots" / COMMIT
    assert f"hub: acme/tiny-sentiment @ main = {COMMIT} -> {snapshot}" in out
    assert "local: " in out and "is a local directory; skipped" in out
    assert f"HF_HUB_CACHE={cache}" in out and "HF_HUB_OFFLINE=1" in out

    sentiment_spec(spec, "acme/not-cached")
    assert main(["download", "--spec", str(spec), "--cache", str(cache)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'acme/not-cached'" in err and "not in the local cache" in err


def test_download_fetches_the_pinned_commit_and_an_offline_run_uses_it(
    tmp_path, tiny_models, monkeypatch, capsys
):
    """The hub is replaced at its network boundary (model_info, repo_info, the file fetch)."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    model_dir = tiny_models["text-classification"]
    listing = [
        *(p.name for p in model_dir.iterdir()),
        "pytorch_model.bin",
        "tf_model.h5",
        "onnx/model.onnx",
        "onnx/config.json",
    ]
    fetches = []

    def fetch(repo_id, *, revision, cache_dir, allow_patterns, ignore_patterns, **_):
        wanted = set(
            filter_repo_objects(
                listing, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
            )
        )
        fetches.append((repo_id, revision, cache_dir, wanted))
        folder = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / revision
        folder.mkdir(parents=True, exist_ok=True)
        for name in wanted:
            shutil.copy(model_dir / name, folder / name)
        return str(folder)

    hub = SimpleNamespace(sha=COMMIT, siblings=[SimpleNamespace(rfilename=f) for f in listing])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo, revision: hub)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, **kwargs: hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    cache = tmp_path / "cache"
    spec = sentiment_spec(tmp_path / "job.yaml", "acme/tiny-sentiment")

    assert main(["download", "--spec", str(spec), "--cache", str(cache)]) == 0

    ((repo_id, revision, cache_dir, wanted),) = fetches
    assert (repo_id, revision, cache_dir) == ("acme/tiny-sentiment", COMMIT, str(cache))
    assert wanted == {p.name for p in model_dir.iterdir()}  # no pickle, TF or ONNX files
    assert COMMIT in capsys.readouterr().out
    monkeypatch.undo()
    # The branch was recorded beside the snapshot: offline, `main` resolves from the cache.
    assert resolve_model("acme/tiny-sentiment", "main", cache_dir=str(cache)).revision == COMMIT

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    output = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "pipelines.enrich",
        "--input",
        str(SAMPLE_DATA / "reviews.csv"),
    ]
    command += ["--output", str(output), "--spec", str(spec), "--limit", "5"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["tasks"][0]["resolved_revision"] == COMMIT
    assert manifest["rows"]["out"] == 5


def test_download_keeps_sentence_transformers_module_folders():
    """Pooling / Dense configs live in sub-folders; ONNX and OpenVINO exports stay behind."""
    from huggingface_hub.utils import filter_repo_objects

    from transforms.models import ResolvedModel, worker_file_patterns

    listing = [
        "config.json",
        "model.safetensors",
        "modules.json",
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "2_Dense/model.safetensors",
        "pytorch_model.bin",
        "onnx/config.json",
        "onnx/model.onnx",
        "openvino/openvino_model.xml",
        "tf_model.h5",
    ]
    model = ResolvedModel(
        model="acme/embedder", requested_revision="main", source="hub", revision=COMMIT
    )
    wanted = set(filter_repo_objects(listing, **worker_file_patterns(model)))
    assert wanted == {
        "config.json",
        "model.safetensors",
        "modules.json",
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "2_Dense/model.safetensors",
    }
