"""Reliability: per-row isolation and accounting, fail-fast set-up, bad data, security,
timeouts and retries."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.cli import main
from transforms.inference import run_task
from transforms.models import is_transient, load_kwargs, resolve_model, retry_transient
from transforms.tasks.base import check_text

SECRET = "hf_" + "Zq7" * 12  # looks like a Hugging Face token


def _spec(path: Path, tasks: list[dict], **top) -> Path:
    path.write_text(json.dumps({"rows_per_chunk": 4, **top, "tasks": tasks}))
    return path


def _sentiment(models, **extra) -> dict:
    return {
        "name": "s",
        "task": "sentiment-analysis",
        "model": str(models["text-classification"]),
        **extra,
    }


def _run(tmp_path, spec, *inputs, extra=()):
    output = tmp_path / "out"
    args = [a for i in inputs for a in ("--input", str(i))]
    code = main([*args, "--output", str(output), "--spec", str(spec), *extra])
    return code, output


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("beam-enrich: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _parts(output: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(output.glob("part-*.parquet")))


# --- 1, 2: per-row isolation and accounting ---------------------------------------


def test_planted_failures_are_counted_and_every_cell_kept(tmp_path, tiny_models):
    inputs = tmp_path / "in"
    inputs.mkdir()
    files = {
        "a.parquet": ["The {mask} was lovely.", None, "Broke in a {mask}.", "no mask here"],
        "b.parquet": ["", "   ", "Great {mask}!", "Fine {mask}.", "\t\n", "It {mask} well."],
        "c.parquet": ["{mask} {mask} twice", "Cheap {mask}.", None],
    }
    for name, texts in files.items():
        table = pa.table(
            {
                "id": [f"{name}:{i}" for i in range(len(texts))],
                "text": pa.array(texts, pa.string()),
                "price": pa.array([1.5 * i for i in range(len(texts))], pa.float64()),
            }
        )
        pq.write_table(table, inputs / name)
    spec = _spec(
        tmp_path / "job.yaml",
        [
            _sentiment(tiny_models),
            {"name": "m", "task": "fill-mask", "model": str(tiny_models["fill-mask"])},
        ],
    )
    code, output = _run(tmp_path, spec, inputs / "*.parquet")
    assert code == 0

    blank = {("a", 1), ("b", 0), ("b", 1), ("b", 4), ("c", 2)}  # null, empty, whitespace
    no_single_mask = {("a", 3), ("c", 0)}  # fill-mask needs exactly one mask
    expected = {(f, r, "s", "InvalidInput") for f, r in blank} | {
        (f, r, "m", "InvalidInput") for f, r in blank | no_single_mask
    }
    records = [json.loads(line) for line in (output / "errors.jsonl").read_text().splitlines()]
    assert {
        (Path(r["file"]).stem, r["row"], r["task"], r["error_type"]) for r in records
    } == expected
    assert len(records) == len(expected) and all(r["message"] for r in records)

    manifest = json.loads((output / "manifest.json").read_text())
    rows = sum(len(t) for t in files.values())
    assert manifest["rows"] == {"in": rows, "limit": None, "out": rows, "failed": {"s": 5, "m": 7}}
    for task in manifest["tasks"]:
        assert task["rows"] == rows
        assert task["succeeded"] + task["failed"] == rows
    assert sum(f["rows"] for f in manifest["output"]["files"]) == rows

    result = _parts(output).sort_by("id")
    original = pa.concat_tables(pq.read_table(inputs / n) for n in sorted(files)).sort_by("id")
    assert result.select(original.column_names).equals(original)
    failed = {(r["file"], r["row"]) for r in records if r["task"] == "m"}
    assert sum(v is None for v in result.column("m").to_pylist()) == len(failed)


def test_a_row_whose_inference_raises_fails_alone(tmp_path, tiny_models):
    """A prompt longer than the context raises in inference; its neighbours get results."""
    texts = ["Short prompt.", "word " * 5000, "Another one."]
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": texts}), source)
    spec = _spec(
        tmp_path / "job.yaml",
        [
            {
                "name": "g",
                "task": "text-generation",
                "model": str(tiny_models["text-generation"]),
                "params": {"max_new_tokens": 3},
            }
        ],
    )
    code, output = _run(tmp_path, spec, source)
    assert code == 0
    result = _parts(output)
    assert [v is None for v in result.column("g").to_pylist()] == [False, True, False]
    (record,) = [json.loads(line) for line in (output / "errors.jsonl").read_text().splitlines()]
    assert (record["row"], record["task"]) == (1, "g")
    assert result.column("text").to_pylist() == texts


# --- 5: fail fast on bad set-up ----------------------------------------------------


def test_setup_problems_exit_2_with_one_line(tmp_path, tiny_models, capsys):
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a"], "n": [1]}), source)

    def fails(tasks, *inputs, expect):
        spec = _spec(tmp_path / "job.yaml", tasks)
        code, output = _run(tmp_path, spec, *(inputs or (source,)))
        assert code == 2
        line = _one_error_line(capsys)
        for part in expect:
            assert part in line, line
        assert not output.exists()

    fails(
        [_sentiment(tiny_models) | {"model": "acme/not-cached"}],
        expect=["acme/not-cached", "not in the local cache", "HF_HUB_OFFLINE=1", "download"],
    )
    fails(
        [_sentiment(tiny_models) | {"model": str(tmp_path / "nowhere")}],
        expect=["does not exist", "save_pretrained"],
    )
    fails([_sentiment(tiny_models)], tmp_path / "*.csv", expect=["matches no file"])
    fails(
        [_sentiment(tiny_models, input="body")],
        expect=["column 'body'", "set `input:`"],
    )
    fails(
        [_sentiment(tiny_models, input="n")],
        expect=["column 'n'", "int64", "string column"],
    )


def test_unknown_revision_and_unreachable_hub(tmp_path, monkeypatch):
    """The hub's own errors, raised by huggingface_hub as it would online."""
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RevisionNotFoundError

    import transforms.models as models

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "HUB_FIRST_DELAY_S", 0.0)
    request = httpx2.Request("GET", "https://huggingface.co/api/models/acme/m")
    calls = []

    def no_revision(self, repo_id, revision=None, **kwargs):
        calls.append(revision)
        raise RevisionNotFoundError("404", response=httpx2.Response(404, request=request))

    monkeypatch.setattr(HfApi, "model_info", no_revision)
    with pytest.raises(models.ModelError, match="has no revision 'v9'; set `revision`"):
        resolve_model("acme/m", "v9")
    assert calls == ["v9"]  # a 404 is not retried

    def unreachable(self, repo_id, revision=None, **kwargs):
        calls.append(revision)
        # A timeout is retried; a refused connection or a failed name lookup is not
        # (tests/test_clean_runs.py).
        raise httpx2.ConnectTimeout("timed out", request=request)

    calls.clear()
    monkeypatch.setattr(HfApi, "model_info", unreachable)
    with pytest.raises(models.ModelError) as caught:
        resolve_model("acme/m", "main")
    assert calls == ["main"] * models.HUB_ATTEMPTS
    message = str(caught.value)
    assert "\n" not in message
    assert "cannot be reached (ConnectTimeout: timed out)" in message


def test_retry_transient_retries_then_succeeds():
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx2.Request("GET", "https://hub.example/api")
    failures = [
        ConnectionError("reset by peer"),
        HfHubHTTPError("busy", response=httpx2.Response(503, request=request)),
    ]
    waits = []

    def flaky():
        if failures:
            raise failures.pop(0)
        return "ok"

    assert retry_transient(flaky, "test", sleep=waits.append) == "ok"
    assert waits == [1.0, 2.0]  # exponential backoff

    def gone():
        raise HfHubHTTPError("not found", response=httpx2.Response(404, request=request))

    with pytest.raises(HfHubHTTPError):
        retry_transient(gone, "test", sleep=waits.append)
    assert waits == [1.0, 2.0]  # not retried

    def always():
        raise TimeoutError("slow")

    with pytest.raises(TimeoutError):
        retry_transient(always, "test", attempts=3, sleep=waits.append)
    assert waits == [1.0, 2.0, 1.0, 2.0]
    wrapped = OSError("could not load")
    wrapped.__cause__ = httpx2.ReadTimeout("read timed out", request=request)
    assert is_transient(wrapped) and not is_transient(ValueError("bad"))
    tooMany = HfHubHTTPError("slow down", response=httpx2.Response(429, request=request))
    assert is_transient(tooMany)


# --- 6: bad data ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "expect"),
    [
        ("empty.csv", b"", "Empty CSV file"),
        ("empty.parquet", b"", "0 bytes"),
        ("ragged.csv", b"id,text\n1,a\n2,b,c\n3,d\n", "Expected 2 columns, got 3: 2,b,c"),
        ("utf.csv", b"id,text\n1,ok\n2,\xff\xfe bad\n", "invalid UTF8"),
        ("dup.csv", b"id,text,text\n1,a,b\n", "repeats column name(s) ['text']"),
    ],
)
def test_unreadable_files_exit_2_naming_the_file(
    tmp_path, tiny_models, capsys, name, content, expect
):
    source = tmp_path / name
    source.write_bytes(content)
    code, output = _run(tmp_path, _spec(tmp_path / "job.yaml", [_sentiment(tiny_models)]), source)
    assert code == 2
    line = _one_error_line(capsys)
    assert str(source) in line and expect in line
    assert not output.exists()


def test_unreadable_rows_past_the_first_block_exit_2(tmp_path, tiny_models, capsys):
    """A ragged row after the first MB is found mid-run: still one line, exit 2."""
    source = tmp_path / "late.csv"
    pad = "p" * 2000
    body = "".join(f"{i}{pad},\n" for i in range(700))  # empty texts: no inference
    source.write_text(f"id,text\n{body}a,b,c\n")
    spec = _spec(tmp_path / "job.yaml", [_sentiment(tiny_models)], rows_per_chunk=256)
    code, output = _run(tmp_path, spec, source)
    assert code == 2
    line = _one_error_line(capsys)
    assert f"cannot read {source} at data row 701 (line 702)" in line and "got 3: a,b,c" in line
    assert not (output / "manifest.json").exists()


def test_header_only_csv_gives_an_empty_output(tmp_path, tiny_models):
    source = tmp_path / "header.csv"
    source.write_text("id,text\n")
    code, output = _run(tmp_path, _spec(tmp_path / "job.yaml", [_sentiment(tiny_models)]), source)
    assert code == 0
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["rows"] == {"in": 0, "limit": None, "out": 0, "failed": {"s": 0}}


def test_hard_strings_are_kept_exactly(tmp_path, tiny_models):
    texts = [
        None,
        "",
        "word " * 200_000,  # 1,000,000 characters
        "Loved it 😀👍🏽 ‍🔥",
        "שלום עולם مرحبا بالعالم",
        "bell\x07 null\x00 esc\x1b[31m del\x7f",
        "line\r\nbreak\u2028sep",
        "ok",
    ]
    source = tmp_path / "in.parquet"
    table = pa.table({"text": pa.array(texts, pa.string()), "n": list(range(len(texts)))})
    pq.write_table(table, source)
    code, output = _run(tmp_path, _spec(tmp_path / "job.yaml", [_sentiment(tiny_models)]), source)
    assert code == 0
    result = _parts(output).sort_by("n")
    assert result.select(["text", "n"]).equals(table)
    labels = result.column("s_label").to_pylist()
    assert [v is None for v in labels] == [True, True] + [False] * 6
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["tasks"][0]["truncated"] >= 1


@pytest.fixture(scope="module")
def sentiment_dofn(tiny_models):
    from apache_beam.utils import shared

    from transforms.enrich import TaskBinding, _EnrichDoFn
    from transforms.tasks.text_classification import (
        TextClassification,
        TextClassificationParams,
    )

    binding = TaskBinding(
        adapter=TextClassification("s", TextClassificationParams(), input_column="text"),
        model=resolve_model(str(tiny_models["text-classification"])),
        device="cpu",
        max_batch_tokens=512,
    )
    dofn = _EnrichDoFn(binding, shared.Shared())
    dofn.setup()
    return dofn


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b and type(a) is type(b)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=st.lists(
        st.tuples(
            st.none() | st.text(max_size=60),
            st.none() | st.integers(-(2**63), 2**63 - 1),
            st.none() | st.floats(allow_nan=True, allow_infinity=True),
            st.none() | st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_generated_tables_round_trip_cell_for_cell(sentiment_dofn, data):
    from transforms.chunks import Chunk

    text, ints, floats, other = (list(column) for column in zip(*data, strict=True))
    table = pa.table(
        {
            "text": pa.array(text, pa.string()),
            "i": pa.array(ints, pa.int64()),
            "f": pa.array(floats, pa.float64()),
            "other": pa.array(other, pa.large_string()),
        }
    )
    (out,) = sentiment_dofn.process(Chunk(0, "mem", 0, 0, table, table.num_rows))
    assert out.table.schema.names[:4] == table.schema.names
    assert out.table.num_rows == table.num_rows
    for name in table.column_names:
        assert out.table.schema.field(name) == table.schema.field(name)
        before, after = table.column(name).to_pylist(), out.table.column(name).to_pylist()
        assert all(_same(a, b) for a, b in zip(before, after, strict=True))
    errors = out.table.column("enrich_errors").to_pylist()
    labels = out.table.column("s_label").to_pylist()
    assert [bool(e) for e in errors] == [label is None for label in labels]
    assert [bool(e) for e in errors] == [
        not isinstance(check_text(t), str) for t in text
    ]  # only blank or null texts fail


# --- 7: security ---------------------------------------------------------------------


def test_pickle_only_model_needs_allow_pickle_weights(tmp_path, tiny_models, capsys):
    import torch
    from transformers import AutoModelForSequenceClassification

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_models["text-classification"], pickled)
    model = AutoModelForSequenceClassification.from_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["Good kettle."]}), source)

    code, _ = _run(
        tmp_path,
        _spec(tmp_path / "job.yaml", [_sentiment(tiny_models, model=str(pickled))]),
        source,
    )
    assert code == 2
    line = _one_error_line(capsys)
    assert "pytorch_model.bin" in line and "allow_pickle_weights: true" in line

    assert load_kwargs(resolve_model(str(tiny_models["text-classification"])), "fp32")[
        "use_safetensors"
    ]
    allowed = resolve_model(str(pickled), allow_pickle_weights=True)
    assert "use_safetensors" not in load_kwargs(allowed, "fp32")
    spec = _spec(
        tmp_path / "job.yaml",
        [_sentiment(tiny_models, model=str(pickled), allow_pickle_weights=True)],
    )
    code, output = _run(tmp_path, spec, source)
    assert code == 0
    (task,) = json.loads((output / "manifest.json").read_text())["tasks"]
    assert task["allow_pickle_weights"] is True and task["trust_remote_code"] is False


def test_secrets_never_reach_outputs_or_logs(tmp_path, tiny_models, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("MY_SERVICE_API_KEY", SECRET + "env")
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["Good.", None]}), source)
    spec = _spec(tmp_path / "job.yaml", [_sentiment(tiny_models)])
    code, output = _run(
        tmp_path,
        spec,
        source,
        extra=[f"--hf_token={SECRET}", "--api_key", SECRET + "2", f"--db_password={SECRET}3"],
    )
    assert code == 0
    captured = capsys.readouterr()
    for path in output.iterdir():
        assert SECRET not in path.read_text(encoding="utf-8", errors="replace"), path.name
    assert SECRET not in captured.out + captured.err
    manifest = json.loads((output / "manifest.json").read_text())
    assert "--hf_token=***" in manifest["argv"] and "***" in manifest["argv"]
    assert manifest["tasks"][0]["trust_remote_code"] is False


def test_csv_formula_cells_are_neutralized_on_request(tmp_path, tiny_models):
    cells = ['=HYPERLINK("http://x")', "+1", "-2", "@SUM(A1)", "\tx", "\rx", "plain", "a=b"]
    source = tmp_path / "in.csv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows(
            [[c, f"Nice {i}" if i else "=cmd|' /C calc'!A0"] for i, c in enumerate(cells)]
        )
    spec = _spec(tmp_path / "job.yaml", [_sentiment(tiny_models)])
    code, output = _run(tmp_path, spec, source, extra=["--csv-neutralize-formulas"])
    assert code == 0
    rows = []
    for part in sorted(output.glob("part-*.csv")):
        text = part.read_bytes().decode("utf-8")  # read_text would turn \r into \n
        rows.extend(csv.DictReader(io.StringIO(text, newline="")))
    by_id = {row["id"]: row for row in rows}
    expected = {("'" + c if c[0] in "=+-@\t\r" else c) for c in cells}
    assert set(by_id) == expected
    assert by_id["'" + cells[0]]["text"] == "'=cmd|' /C calc'!A0"
    assert by_id["plain"]["text"] == "Nice 6"
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["output"]["csv_neutralize_formulas"] is True


# --- 8: timeouts ---------------------------------------------------------------------


class HangingRunner:
    """Returns texts upper-cased; a batch holding "HANG" blocks until released."""

    def __init__(self):
        self.release = threading.Event()
        self.batches = []

    def prepare(self, texts):
        return list(texts)

    def cost(self, item):
        return len(item)

    def infer(self, items):
        self.batches.append(list(items))
        if any("HANG" in item for item in items):
            self.release.wait(30)
        return [(item.upper(),) for item in items]


def test_a_hung_batch_times_out_without_being_split():
    runner = HangingRunner()
    texts = ["aaaa", "bbbb", "HANG", "cccc", "dd", "ee"]
    try:
        # Budget 8 tokens: batches of two 4-char rows, then the two 2-char rows.
        results, errors, _ = run_task(runner, texts, 8, timeout_s=0.3)
    finally:
        runner.release.set()
    hung = [b for b in runner.batches if "HANG" in b]
    assert len(hung) == 1  # not bisected
    for row, text in enumerate(texts):
        if text in hung[0]:
            assert results[row] is None
            assert errors[row].startswith("TimeoutError: inference on a micro-batch of 2 row(s)")
        else:
            assert results[row] == (text.upper(),) and errors[row] is None
