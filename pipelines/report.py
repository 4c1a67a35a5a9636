"""The run report: what each task wrote, as one HTML page.

The manifest's per-task summaries are made while the run writes its parts
(`transforms.summaries`); `summarize_output` computes the same from a finished output,
streaming it once (only the columns it needs, row group by row group). `render_report`
turns a manifest into a self-contained `report.html`: charts drawn with matplotlib's
Agg canvas and embedded as PNG data URIs, no script, no external URL, and every charted
number also in a table cell tagged `data-task` / `data-metric` / `data-key`, so the page
shows exactly the manifest's numbers and a test can check that it does.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.summaries import Summarizer

__all__ = ["REPORT", "render_report", "summarize_output", "write_report"]

REPORT = "report.html"
_MIME = "application/octet-stream"


def summarize_output(
    part_paths: Sequence[str],
    errors_paths: Sequence[str],
    tasks: Sequence[dict],
    schema: pa.Schema,
    output_format: str,
) -> tuple[dict[str, dict], dict[str, dict[str, int]]]:
    """Summarizes what each task wrote and why rows failed, reading each file once.

    Runs summarize as they write (`transforms.summaries`); this reads a finished output
    again, for outputs made otherwise and to check that both agree.

    Args:
        part_paths: the output's data files (Parquet or CSV, all with `schema`).
        errors_paths: the JSON-lines failure files (`task` and `error_type` per line).
        tasks: the manifest's task descriptions (`name`, `task`, `columns`,
            `input_columns`).
        schema: the output schema (CSV cells are read back to these types).
        output_format: `parquet` or `csv`.

    Returns:
        Task name -> `{"input": input length summary, "output": output summary}`, and
        task name -> error type -> failed rows.
    """
    summarizer = Summarizer(tasks)
    for path in part_paths:
        for table in _read_columns(path, output_format, summarizer.columns, schema):
            summarizer.add(table)
    summaries, _ = summarizer.summaries()
    return summaries, _failures_by_type(errors_paths, [t["name"] for t in tasks])


def _read_columns(
    path: str, output_format: str, columns: list[str], schema: pa.Schema
) -> Iterator[pa.Table]:
    with FileSystems.open(path, _MIME, CompressionTypes.UNCOMPRESSED) as handle:
        if output_format == "parquet":
            staged = pq.ParquetFile(handle)
            for group in range(staged.num_row_groups):
                yield staged.read_row_group(group, columns=columns)
            return
        yield from _read_csv_columns(handle, columns, schema)


def _read_csv_columns(handle, columns: list[str], schema: pa.Schema) -> Iterator[pa.Table]:
    nested = [c for c in columns if pa.types.is_nested(schema.field(c).type)]
    types = {c: pa.string() if c in nested else _plain(schema.field(c).type) for c in columns}
    reader = pacsv.open_csv(
        handle,
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            include_columns=columns,
            column_types=types,
            # Only an empty cell is a missing value: "NA" or "null" are real outputs.
            null_values=[""],
            strings_can_be_null=True,
        ),
    )
    for batch in reader:
        table = pa.Table.from_batches([batch])
        for name in nested:
            # The CSV writer wrote nested cells as JSON text; read them back to their type.
            cells = [None if v is None else json.loads(v) for v in table.column(name).to_pylist()]
            index = table.schema.get_field_index(name)
            table = table.set_column(index, name, pa.array(cells, schema.field(name).type))
        yield table


def _plain(type_: pa.DataType) -> pa.DataType:
    """The type to read a CSV column as: no dictionaries, no views (CSV reads neither)."""
    if pa.types.is_dictionary(type_):
        return _plain(type_.value_type)
    if pa.types.is_string_view(type_):
        return pa.string()
    if pa.types.is_binary_view(type_):
        return pa.binary()
    return type_


def _failures_by_type(paths: Sequence[str], task_names: Sequence[str]) -> dict[str, dict]:
    counts: dict[str, Counter] = {name: Counter() for name in task_names}
    for path in paths:
        with FileSystems.open(path, _MIME, CompressionTypes.UNCOMPRESSED) as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    counts.setdefault(record["task"], Counter())[record["error_type"]] += 1
    return {task: dict(sorted(found.items())) for task, found in counts.items()}


def write_report(path: str, manifest: dict) -> None:
    """Writes `render_report(manifest)` to `path` (any Beam filesystem)."""
    page = render_report(manifest)
    with FileSystems.create(path, "text/html") as handle:
        handle.write(page.encode("utf-8"))


# --- HTML -----------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ccc}
h3{font-size:1.1em}table{border-collapse:collapse;margin:.5em 0 1em}
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left;font-size:.9em}
td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;height:auto}
.muted{color:#666}.tables{display:flex;flex-wrap:wrap;gap:0 1.5em;align-items:flex-start}
caption{text-align:left;font-weight:bold;font-size:.9em}
"""


def render_report(manifest: dict) -> str:
    """The run report for a manifest, as one self-contained HTML page.

    Args:
        manifest: a manifest as `finalize_run` builds it, with each task's `summary`
            and the run's `failed_by_type`.

    Returns:
        The HTML text: no script, no external resource; charts are embedded PNGs.
    """
    charts = _Charts()
    tasks = manifest["tasks"]
    failed_by_type = manifest.get("failed_by_type") or {}
    rows = manifest["rows"]
    facts = [
        ("run id", manifest["run_id"], None),
        ("started", manifest["started_at"], None),
        ("finished", manifest["finished_at"], None),
        ("runner", manifest["runner"], None),
        ("input files", len(manifest["inputs"]), "input_files"),
        ("output format", manifest["output"]["format"], None),
        ("rows in", rows["in"], "rows_in"),
        ("rows out", rows["out"], "rows_out"),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>beam-enrich run {_esc(manifest['run_id'])}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>beam-enrich run report</h1>",
        "<table>",
        *(
            f"<tr><th>{_esc(label)}</th>{_cell(value, '', metric) if metric else _td(value)}</tr>"
            for label, value, metric in facts
        ),
        "</table>",
        "<h2>Throughput</h2>",
        charts.bars(
            "Rows per second of inference time, per task",
            {t["name"]: t.get("rows_per_second") or 0 for t in tasks},
            xlabel="rows / s",
        ),
        "<table><tr><th>task</th><th>family</th><th>model</th><th>device</th><th>rows</th>"
        "<th>failed</th><th>truncated</th><th>inference s</th><th>rows / s</th></tr>",
        *(
            "<tr>"
            f"{_td(t['name'])}{_td(t['task'])}{_td(_model(t))}"
            f"{_td(', '.join(t.get('devices_used') or []))}"
            f"{_cell(t['rows'], t['name'], 'rows')}{_cell(t['failed'], t['name'], 'failed')}"
            f"{_cell(t.get('truncated'), t['name'], 'truncated')}"
            f"{_cell(t.get('inference_seconds'), t['name'], 'inference_seconds')}"
            f"{_cell(t.get('rows_per_second'), t['name'], 'rows_per_second')}"
            "</tr>"
            for t in tasks
        ),
        "</table>",
        "<h2>Failures by error type</h2>",
        *_failures(failed_by_type, charts),
        "<h2>Tasks</h2>",
    ]
    for task in tasks:
        parts.extend(_task_section(task, charts))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _model(task: dict) -> str:
    revision = str(task.get("resolved_revision") or "")
    return f"{task.get('model')} @ {revision[:19]}" if revision else str(task.get("model"))


def _failures(failed_by_type: dict, charts: _Charts) -> list[str]:
    flat = {
        f"{task}: {error_type}": n
        for task, found in failed_by_type.items()
        for error_type, n in found.items()
    }
    if not flat:
        return ['<p class="muted">No row failed.</p>']
    return [
        charts.bars("Failed rows by task and error type", flat, xlabel="rows"),
        "<table><tr><th>task</th><th>error type</th><th>rows</th></tr>",
        *(
            f"<tr>{_td(task)}{_td(error_type)}{_cell(n, task, 'failed_by_type', error_type)}</tr>"
            for task, found in failed_by_type.items()
            for error_type, n in found.items()
        ),
        "</table>",
    ]


#: Summaries shown as a table only: one bar says nothing.
_UNCHARTED = {"dimension_counts"}


def _task_section(task: dict, charts: _Charts) -> list[str]:
    name = task["name"]
    parts = [f"<h3>{_esc(name)} <span class='muted'>({_esc(task['task'])})</span></h3>"]
    summary = task.get("summary")
    if not summary:
        return [*parts, '<p class="muted">No summary for this task.</p>']
    panels = [(f"input {summary['input']['column']}: characters", summary["input"]["characters"])]
    metrics = [("input.characters", summary["input"]["characters"])]
    for key, value in summary["output"].items():
        if isinstance(value, dict):
            metrics.append((f"output.{key}", value))
            if key not in _UNCHARTED:
                panels.append((key.replace("_", " "), value))
    parts.append(charts.panels(name, panels))
    scalars = {"input.missing": summary["input"]["missing"]}
    scalars.update(
        {
            f"output.{key}": value
            for key, value in summary["output"].items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
    )
    tables = [
        "<table><caption>counts</caption>",
        *(f"<tr><th>{_esc(m)}</th>{_cell(v, name, m)}</tr>" for m, v in scalars.items()),
        "</table>",
    ]
    for metric, value in metrics:
        tables.append(
            _histogram_table(value, name, metric)
            if "edges" in value
            else _counts_table(value, name, metric)
        )
    return [*parts, '<div class="tables">', *tables, "</div>"]


def _histogram_table(histogram: dict, task: str, metric: str) -> str:
    """Rows per bin (`data-key`: the bin's index), then the histogram's statistics."""
    bins = "".join(
        f"<tr><th>{_esc(label)}</th>{_cell(n, task, metric, str(i))}</tr>"
        for i, (label, n) in enumerate(
            zip(_bin_labels(histogram["edges"]), histogram["counts"], strict=True)
        )
    )
    stats = "".join(
        f"<tr><th>{label}</th>{_cell(histogram[key], task, f'{metric}.{key}')}</tr>"
        for key, label in _HISTOGRAM_STATS.items()
    )
    return (
        f"<table><caption>{_esc(metric)}</caption><tr><th>bin</th><th>count</th></tr>"
        f"{bins}{stats}</table>"
    )


_HISTOGRAM_STATS = {
    "count": "values",
    "min": "min",
    "max": "max",
    "mean": "mean",
    "below": "below range",
    "above": "above range",
}


def _counts_table(counts: dict, task: str, metric: str) -> str:
    """Rows per value (`data-key`: the value), then the rest and the number of values."""
    rows = "".join(
        f"<tr>{_td(key)}{_cell(n, task, metric, key)}</tr>" for key, n in counts["counts"].items()
    )
    return (
        f"<table><caption>{_esc(metric)}</caption><tr><th>value</th><th>count</th></tr>{rows}"
        f"<tr><th>(other values)</th>{_cell(counts['other'], task, f'{metric}.other')}</tr>"
        f"<tr><th>distinct values</th>"
        f"{_cell(counts['distinct'], task, f'{metric}.distinct')}</tr></table>"
    )


def _bin_labels(edges: Sequence[float]) -> list[str]:
    whole = all(isinstance(e, int) for e in edges)
    labels = []
    for low, high in itertools.pairwise(edges):
        if whole and high - low == 1:
            labels.append(str(low))
        elif whole:
            labels.append(f"{low}-{high - 1}")
        else:
            labels.append(f"{low:g}-{high:g}")
    return labels


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _td(value) -> str:
    return f"<td>{_esc(value)}</td>"


def _cell(value, task: str, metric: str, key: str = "") -> str:
    shown = "" if value is None else value
    return (
        f'<td class="n" data-task="{_esc(task)}" data-metric="{_esc(metric)}" '
        f'data-key="{_esc(key)}">{_esc(shown)}</td>'
    )


class _Charts:
    """Draws figures on matplotlib's Agg canvas and returns them as <img> data URIs."""

    def __init__(self):
        # Imported here: matplotlib is only needed when a report is made.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self._figure = Figure
        self._canvas = FigureCanvasAgg

    def bars(self, title: str, values: dict, *, xlabel: str) -> str:
        figure = self._figure(figsize=(8, 0.8 + 0.35 * max(len(values), 1)), dpi=80)
        axes = figure.subplots()
        _barh(axes, values)
        axes.set_title(title)
        axes.set_xlabel(xlabel)
        return self._img(figure, title)

    def panels(self, title: str, panels: list[tuple[str, dict]]) -> str:
        figure = self._figure(figsize=(4 * len(panels), 3.2), dpi=80)
        grid = figure.subplots(1, len(panels), squeeze=False)[0]
        for axes, (label, data) in zip(grid, panels, strict=True):
            if "edges" in data:
                labels = _bin_labels(data["edges"])
                axes.bar(range(len(labels)), data["counts"], color="#4c78a8")
                axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
            else:
                _barh(axes, data["counts"])
            if not (data["count"] if "edges" in data else data["counts"]):
                axes.text(0.5, 0.5, "no values", ha="center", transform=axes.transAxes)
            axes.set_title(label, fontsize=10)
        figure.suptitle(title)
        return self._img(figure, f"{title}: {', '.join(label for label, _ in panels)}")

    def _img(self, figure, alt: str) -> str:
        figure.tight_layout()
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            # Labels in scripts the bundled font lacks draw as boxes; not worth a warning.
            warnings.filterwarnings("ignore", message="Glyph .* missing")
            self._canvas(figure).print_png(buffer, metadata={"Software": None})
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        return f'<p><img alt="{_esc(alt)}" src="data:image/png;base64,{encoded}"></p>'


def _barh(axes, values: dict) -> None:
    names = list(values)[::-1]  # largest on top
    axes.barh(range(len(names)), [values[n] for n in names], color="#4c78a8")
    axes.set_yticks(range(len(names)), [str(n)[:40] for n in names], fontsize=8)
