"""The run report: summaries in the manifest, report.html beside it, rendered by a browser."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import subprocess
import types
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import manifest as manifest_module
from pipelines import output as output_module
from pipelines.cli import main
from pipelines.report import REPORT, render_report, summarize_output
from tests.conftest import SAMPLE_DATA
from transforms.io import write_table

ROWS = 12
NULL_ROW = 3  # its text is null: every task fails it with InvalidInput


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_models) -> tuple[Path, dict]:
    """One small run (sentiment and ner, one failing row): its output and manifest."""
    folder = tmp_path_factory.mktemp("report")
    table = pq.read_table(SAMPLE_DATA / "reviews.parquet").slice(0, ROWS)
    texts = table.column("text").to_pylist()
    texts[NULL_ROW] = None
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts))
    source = folder / "in.parquet"
    pq.write_table(table, source)
    spec = {
        "tasks": [
            {
                "name": "sentiment",
                "task": "sentiment-analysis",
                "model": str(tiny_models["text-classification"]),
            },
            {"name": "entities", "task": "ner", "model": str(tiny_models["token-classification"])},
        ]
    }
    (folder / "job.yaml").write_text(json.dumps(spec))  # JSON is YAML
    output = folder / "out"
    args = ["--input", str(source), "--output", str(output), "--spec", str(folder / "job.yaml")]
    assert main(args) == 0
    return output, json.loads((output / "manifest.json").read_text())


class _NumberCells(HTMLParser):
    """Collects the report's tagged number cells: (task, metric, key) -> text."""

    def __init__(self):
        super().__init__()
        self.cells: dict[tuple[str, str, str], str] = {}
        self._open: tuple[str, str, str] | None = None

    def handle_starttag(self, tag, attrs):
        found = dict(attrs)
        if tag == "td" and "data-metric" in found:
            self._open = (found["data-task"], found["data-metric"], found["data-key"])
            self.cells[self._open] = ""

    def handle_data(self, data):
        if self._open:
            self.cells[self._open] += data

    def handle_endtag(self, tag):
        if tag == "td":
            self._open = None


def _expected_cells(manifest: dict) -> dict[tuple[str, str, str], str]:
    """What the report must show for a manifest, built from the manifest alone."""
    expected = {
        ("", "rows_in", ""): manifest["rows"]["in"],
        ("", "rows_out", ""): manifest["rows"]["out"],
        ("", "input_files", ""): len(manifest["inputs"]),
    }
    for task, found in manifest["failed_by_type"].items():
        for error_type, n in found.items():
            expected[(task, "failed_by_type", error_type)] = n
    for task in manifest["tasks"]:
        name, summary = task["name"], task["summary"]
        for metric in ("rows", "failed", "truncated", "inference_seconds", "rows_per_second"):
            expected[(name, metric, "")] = task[metric]
        expected[(name, "input.missing", "")] = summary["input"]["missing"]
        summaries = {"input.characters": summary["input"]["characters"]}
        summaries.update({f"output.{k}": v for k, v in summary["output"].items()})
        for metric, value in summaries.items():
            if not isinstance(value, dict):
                continue
            if "edges" in value:  # a histogram
                for i, n in enumerate(value["counts"]):
                    expected[(name, metric, str(i))] = n
                for stat in ("count", "min", "max", "mean", "below", "above"):
                    expected[(name, f"{metric}.{stat}", "")] = value[stat]
            else:  # counts per value
                for key, n in value["counts"].items():
                    expected[(name, metric, key)] = n
                expected[(name, f"{metric}.other", "")] = value["other"]
                expected[(name, f"{metric}.distinct", "")] = value["distinct"]
    return {key: "" if value is None else str(value) for key, value in expected.items()}


def test_summaries_in_the_manifest_match_the_output(run):
    output, manifest = run
    table = pq.read_table(next(output.glob("part-*.parquet")))
    records = [json.loads(line) for line in (output / "errors.jsonl").read_text().splitlines()]

    assert manifest["output"]["report"] == str(output / REPORT)
    assert manifest["failed_by_type"] == {
        task: dict(Counter(r["error_type"] for r in records if r["task"] == task))
        for task in ("sentiment", "entities")
    }
    assert manifest["failed_by_type"]["sentiment"] == {"InvalidInput": 1}

    sentiment, entities = (task["summary"] for task in manifest["tasks"])
    texts = [t for t in table.column("text").to_pylist() if t is not None]
    characters = sentiment["input"]["characters"]
    assert sentiment["input"] == entities["input"]
    assert sentiment["input"]["missing"] == 1
    assert characters["count"] == sum(characters["counts"]) == len(texts) == ROWS - 1
    assert characters["min"] == min(map(len, texts)) and characters["max"] == max(map(len, texts))
    for count, low, high in zip(
        characters["counts"], characters["edges"], characters["edges"][1:], strict=False
    ):
        assert count == sum(low <= len(t) < high for t in texts)

    labels = Counter(v for v in table.column("sentiment_label").to_pylist() if v is not None)
    assert sentiment["output"]["label_counts"]["counts"] == dict(labels)
    assert sum(sentiment["output"]["score"]["counts"]) == ROWS - 1
    found = [e for row in table.column("entities").to_pylist() if row for e in row]
    groups = Counter(entity["entity_group"] for entity in found)
    assert entities["output"]["entity_counts"]["counts"] == dict(groups)
    assert entities["output"]["score"]["count"] == len(found)


def test_report_is_self_contained_and_its_numbers_are_the_manifests(run):
    output, manifest = run
    page = (output / REPORT).read_text(encoding="utf-8")

    assert "<script" not in page.lower() and "url(" not in page
    assert not re.search(r"https?://", page)
    sources = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    # A chart for throughput, for failures, and one per task.
    assert len(sources) == 2 + len(manifest["tasks"])
    for source in sources:
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix)
        assert base64.b64decode(source[len(prefix) :]).startswith(b"\x89PNG\r\n\x1a\n")

    parser = _NumberCells()
    parser.feed(page)
    assert parser.cells == _expected_cells(manifest)
    assert parser.cells[("sentiment", "failed_by_type", "InvalidInput")] == "1"
    assert parser.cells[("", "rows_out", "")] == str(ROWS)


def test_csv_output_gives_the_same_summaries(run, tmp_path):
    output, manifest = run
    part = next(output.glob("part-*.parquet"))
    table = pq.read_table(part)
    csv_part = tmp_path / "part.csv"
    write_table(str(csv_part), table, "csv")  # nested cells become JSON text
    errors = [str(output / "errors.jsonl")]
    args = (manifest["tasks"], table.schema)

    from_parquet = summarize_output([str(part)], errors, *args, "parquet")
    from_csv = summarize_output([str(csv_part)], errors, *args, "csv")
    assert from_csv == from_parquet
    assert from_parquet[0] == {task["name"]: task["summary"] for task in manifest["tasks"]}


def test_summaries_made_while_writing_equal_a_read_of_the_csv_output(tmp_path, tiny_models):
    """Two work items (two parts), CSV output: the per-part summaries, added up at
    publish, equal a summary read back from the published CSV files."""
    table = pq.read_table(SAMPLE_DATA / "reviews.parquet").slice(0, ROWS)
    texts = table.column("text").to_pylist()
    texts[NULL_ROW], texts[NULL_ROW + 1] = None, ""
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts))
    sources = tmp_path / "in"
    sources.mkdir()
    pq.write_table(table.slice(0, 5), sources / "a.parquet")
    pq.write_table(table.slice(5), sources / "b.parquet")
    model = str(tiny_models["text-classification"])
    spec = tmp_path / "job.yaml"
    spec.write_text(
        json.dumps({"tasks": [{"name": "s", "task": "sentiment-analysis", "model": model}]})
    )
    output = tmp_path / "out"
    args = ["--input", str(sources), "--output", str(output), "--spec", str(spec)]
    assert main([*args, "--output-format", "csv", "--quiet"]) == 0
    manifest = json.loads((output / "manifest.json").read_text())

    parts = sorted(str(p) for p in output.glob("part-*.csv"))
    assert len(parts) == 2
    # The columns the summaries read, as the run typed them.
    schema = pa.schema([("text", pa.string()), ("s_label", pa.string()), ("s_score", pa.float32())])
    summaries, failed = summarize_output(
        parts, [str(output / "errors.jsonl")], manifest["tasks"], schema, "csv"
    )
    assert {task["name"]: task["summary"] for task in manifest["tasks"]} == summaries
    assert manifest["failed_by_type"] == failed
    assert summaries["s"]["input"]["missing"] == 2  # null, and empty as CSV reads it


def test_a_report_error_never_fails_the_run(monkeypatch, tmp_path, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("chart library missing")

    monkeypatch.setattr(output_module, "merge_summaries", broken)
    manifest = manifest_module.Manifest.model_construct(
        output=manifest_module.OutputRecord.model_construct(report="was set"), tasks=[]
    )
    context = types.SimpleNamespace(
        output=str(tmp_path), tasks=[], output_schema=pa.schema([]), output_format="parquet"
    )
    path = tmp_path / REPORT
    with caplog.at_level(logging.ERROR):
        manifest = output_module._add_report(manifest, [], context, str(tmp_path))
    assert manifest.output.report is None
    assert not path.exists()
    assert "report could not be made" in caplog.text


def test_report_of_an_empty_run_renders():
    manifest = {
        "run_id": "r",
        "started_at": "s",
        "finished_at": "f",
        "runner": "x",
        "inputs": [],
        "output": {"format": "csv"},
        "rows": {"in": 0, "out": 0},
        "tasks": [],
        "failed_by_type": {},
    }
    page = render_report(manifest)
    assert "No row failed." in page and page.count("<img") == 1


_CHECK_IMAGES = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const drawn = images.filter((image) => image.complete && image.naturalWidth > 0);
  document.body.dataset.rendered = `${drawn.length}/${images.length}`;
});
</script>
"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None,
    reason="no chromium binary on PATH (CI installs Debian's `chromium`; see README)",
)
def test_report_renders_in_headless_chromium(run, tmp_path):
    output, manifest = run
    page = (output / REPORT).read_text(encoding="utf-8")
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", _CHECK_IMAGES + "</body>"), encoding="utf-8")
    profile = tmp_path / "profile"
    profile.mkdir()
    result = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            # Lets the load event and its handler run before the DOM is dumped.
            "--virtual-time-budget=5000",
            "--dump-dom",
            checked.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    images = page.count("<img")
    assert images == 2 + len(manifest["tasks"])
    assert f'data-rendered="{images}/{images}"' in result.stdout, result.stdout[:2000]
    assert "beam-enrich run report" in result.stdout
