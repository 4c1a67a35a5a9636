"""The output folder is never lost or clobbered: what a run may replace, where it may
write, one run per output at a time, and what an interrupted or failed run says it left.

Checks that must happen before any model loads run with `resolve_model` made to fail,
so a check that came too late shows up as exit 1 instead of 2.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from apache_beam.io.filesystem import FileMetadata, FileSystem

import pipelines.enrich
import pipelines.job
import pipelines.output
from pipelines.cli import main
from pipelines.output import check_output, lock_output
from tests.conftest import SAMPLE_DATA
from transforms.io import InputError

INPUT = SAMPLE_DATA / "reviews.parquet"


def _spec(path: Path, models: dict) -> Path:
    model = str(models["text-classification"])
    task = {"name": "sentiment", "task": "sentiment-analysis", "model": model}
    path.write_text(json.dumps({"rows_per_chunk": 4, "tasks": [task]}))
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.rglob("*"))
    }


def _run_id(output: Path) -> str:
    return json.loads((output / "manifest.json").read_text())["run_id"]


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, tiny_models) -> tuple[Path, Path]:
    """(spec, a complete earlier output of it): tests copy the output before changing it."""
    folder = tmp_path_factory.mktemp("earlier")
    spec = _spec(folder / "job.yaml", tiny_models)
    output = folder / "base"
    args = ["--input", str(INPUT), "--output", str(output), "--spec", str(spec), "--limit", "4"]
    assert main([*args, "--quiet"]) == 0
    return spec, output


@pytest.fixture
def no_models(monkeypatch):
    """Fails the run if a model is resolved: the checks under test must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was resolved before the output was checked")

    monkeypatch.setattr(pipelines.job, "resolve_model", refuse)


def test_folder_holding_the_input_and_a_foreign_manifest_is_refused_and_kept(
    tmp_path, tiny_models, no_models, capsys
):
    """The reporter's case: `--output ds` where ds/ holds the input itself."""
    ds = tmp_path / "ds"
    ds.mkdir()
    shutil.copyfile(INPUT, ds / "reviews.parquet")
    (ds / "README.txt").write_text("my dataset")
    (ds / "manifest.json").write_text('{"dataset": "x"}')
    before = _snapshot(ds)
    spec = _spec(tmp_path / "job.yaml", tiny_models)
    args = ["--input", str(ds / "reviews.parquet"), "--output", str(ds), "--spec", str(spec)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("beam-enrich: error: ") and err.count("\n") == 1
    assert "reviews.parquet" in err
    assert _snapshot(ds) == before


def test_manifest_not_written_by_beam_enrich_does_not_make_a_folder_replaceable(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"dataset": "x"}')
    (out / "part-00000-of-00001.parquet").write_bytes(INPUT.read_bytes())
    with pytest.raises(InputError, match=r"its manifest\.json is not beam-enrich's"):
        check_output(str(out))
    (out / "manifest.json").write_text("not json")
    with pytest.raises(InputError, match=r"its manifest\.json is not beam-enrich's"):
        check_output(str(out))
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "part-00000-of-00001.parquet",
    ]


def test_files_added_to_an_earlier_output_are_refused(tmp_path, earlier):
    output = tmp_path / "base"
    shutil.copytree(earlier[1], output)
    (tmp_path / "empty").mkdir()
    assert check_output(str(tmp_path / "empty")) == str(tmp_path / "empty")
    assert check_output(str(output) + "/") == str(output)  # beam-enrich's own: replaceable
    (output / "NOTES.md").write_text("my notes")
    (output / "analysis").mkdir()
    with pytest.raises(
        InputError, match="is an earlier beam-enrich output but also holds"
    ) as refused:
        check_output(str(output))
    assert "NOTES.md" in str(refused.value) and "analysis/" in str(refused.value)
    (output / "NOTES.md").unlink()
    with pytest.raises(InputError, match="analysis/"):  # a sub-folder alone is foreign too
        check_output(str(output))


def test_symlinked_output_is_published_into_its_target(tmp_path, earlier):
    spec, source = earlier
    target = tmp_path / "target"
    shutil.copytree(source, target)
    link = tmp_path / "link_out"
    link.symlink_to(target, target_is_directory=True)
    old_run = _run_id(target)
    args = ["--input", str(INPUT), "--output", str(link), "--spec", str(spec), "--limit", "4"]
    assert main([*args, "--quiet"]) == 0
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert _run_id(target) != old_run
    manifest = json.loads((target / "manifest.json").read_text())
    assert all(Path(f["path"]).parent == target for f in manifest["output"]["files"])
    assert not (tmp_path / ".link_out.beam-enrich").exists()
    assert not list((tmp_path / ".target.beam-enrich").glob("previous-*"))


@pytest.mark.parametrize("case", ["under_a_file", "cwd", "holds_input", "unwritable"])
def test_bad_output_location_exits_2_before_models_load(
    case, tmp_path, tiny_models, no_models, monkeypatch, capsys
):
    spec = _spec(tmp_path / "job.yaml", tiny_models)
    data = tmp_path / "data"
    data.mkdir()
    source = data / "reviews.parquet"
    shutil.copyfile(INPUT, source)
    (tmp_path / "afile").write_text("a file")
    output, expected = {
        "under_a_file": (str(tmp_path / "afile" / "sub"), "is a file, not a folder"),
        "cwd": (".", "the working folder"),
        "holds_input": (str(tmp_path), f"input file {source}"),
        "unwritable": (str(tmp_path / "locked" / "out"), "is not writable"),
    }[case]
    if case == "cwd":
        monkeypatch.chdir(data)
    if case == "unwritable":
        (tmp_path / "locked").mkdir()
        # Tests may run as root, whom permissions do not stop: the check asks os.access.
        real_access = os.access
        monkeypatch.setattr(
            pipelines.output.os,
            "access",
            lambda path, mode: not str(path).endswith("locked") and real_access(path, mode),
        )
    before = _snapshot(tmp_path)
    assert main(["--input", str(source), "--output", output, "--spec", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("beam-enrich: error: --output") and expected in err
    assert _snapshot(tmp_path) == before


def test_second_run_on_a_locked_output_exits_2_naming_the_first(
    tmp_path, tiny_models, no_models, capsys
):
    spec = _spec(tmp_path / "job.yaml", tiny_models)
    output = tmp_path / "out"
    staged = tmp_path / ".out.beam-enrich" / "runs" / "first-run" / "part.parquet"
    args = ["--input", str(INPUT), "--output", str(output), "--spec", str(spec)]
    with lock_output(str(output), "first-run"):
        staged.parent.mkdir(parents=True)
        staged.write_bytes(b"the first run's work")
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "run id first-run" in err and f"pid {os.getpid()}" in err
    assert staged.read_bytes() == b"the first run's work"  # not cleaned up under the first
    assert not (tmp_path / ".out.beam-enrich" / "lock").exists()  # released at the end


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    lock = tmp_path / ".out.beam-enrich" / "lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"run_id": "killed", "pid": dead.pid, "host": os.uname()[1]}))
    with lock_output(str(tmp_path / "out"), "next-run"):
        held = json.loads(lock.read_text())
        assert held["run_id"] == "next-run" and held["pid"] == os.getpid()
    assert not lock.exists()


def test_ctrl_c_in_the_swap_exits_130_and_keeps_the_previous_output(
    tmp_path, earlier, monkeypatch, capsys
):
    spec, source = earlier
    output = tmp_path / "out"
    shutil.copytree(source, output)
    before = _snapshot(output)

    def interrupt(name):
        if name == "swapping":  # the previous output is moved aside at this point
            raise KeyboardInterrupt

    monkeypatch.setattr(pipelines.output, "_kill_point", interrupt)
    args = ["--input", str(INPUT), "--output", str(output), "--spec", str(spec), "--limit", "4"]
    assert main([*args, "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err == f"beam-enrich: interrupted; the previous output in {output} is unchanged\n"
    assert _snapshot(output) == before
    root = tmp_path / ".out.beam-enrich"
    assert not list(root.glob("previous-*")) and not (root / "lock").exists()


def test_ctrl_c_before_a_first_output_says_nothing_was_written(
    tmp_path, tiny_models, monkeypatch, capsys
):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipelines.enrich, "prepare_output", interrupt)
    spec = _spec(tmp_path / "job.yaml", tiny_models)
    output = tmp_path / "out"
    assert main(["--input", str(INPUT), "--output", str(output), "--spec", str(spec)]) == 130
    assert capsys.readouterr().err == f"beam-enrich: interrupted; nothing was written to {output}\n"
    assert not output.exists()
    assert not (tmp_path / ".out.beam-enrich").exists()  # the lock and its folder are gone


def test_failed_run_says_the_previous_output_is_unchanged(tmp_path, earlier, monkeypatch, capsys):
    spec, source = earlier
    output = tmp_path / "out"
    shutil.copytree(source, output)
    before = _snapshot(output)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pipelines.enrich, "prepare_output", fail)
    assert main(["--input", str(INPUT), "--output", str(output), "--spec", str(spec)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"beam-enrich: error: the run failed (OSError: disk full); "
        f"the previous output in {output} is unchanged"
    )
    assert _snapshot(output) == before


# An object store in memory for the remote code path (tests/test_runners.py has its own
# for `objstore://`: importing a test module from another would register that one twice).
_OBJECTS: dict[str, bytes] = {}


class _ObjectStore(FileSystem):
    """`objstore://`: flat keys, no folders, no atomic rename, as on gs:// or s3://."""

    @classmethod
    def scheme(cls):
        return "objstore"

    def join(self, basepath, *paths):
        return "/".join([basepath.rstrip("/"), *(p.strip("/") for p in paths)])

    def split(self, path):
        head, _, tail = path.rstrip("/").rpartition("/")
        return head, tail

    def mkdirs(self, path):
        pass

    def has_dirs(self):
        return False

    def _list(self, prefix):
        for path in sorted(_OBJECTS):
            if path.startswith(prefix):
                yield self.metadata(path)

    def create(self, path, mime_type=None, compression_type=None):
        class Upload(io.BytesIO):
            def close(self):
                if not self.closed:  # the object appears on close
                    _OBJECTS[path] = self.getvalue()
                super().close()

        return Upload()

    def open(self, path, mime_type=None, compression_type=None):
        return io.BytesIO(_OBJECTS[path])

    def copy(self, sources, destinations):
        for source, destination in zip(sources, destinations, strict=True):
            _OBJECTS[destination] = _OBJECTS[source]

    def rename(self, sources, destinations):
        for source, destination in zip(sources, destinations, strict=True):
            _OBJECTS[destination] = _OBJECTS.pop(source)

    def exists(self, path):
        return path in _OBJECTS

    def size(self, path):
        return len(_OBJECTS[path])

    def last_updated(self, path):
        return 0.0

    def checksum(self, path):
        return str(len(_OBJECTS[path]))

    def metadata(self, path):
        return FileMetadata(path, len(_OBJECTS[path]), 0.0)

    def delete(self, paths):
        for path in paths:
            del _OBJECTS[path]


@pytest.fixture
def object_store():
    _OBJECTS.clear()
    yield _OBJECTS
    _OBJECTS.clear()


def test_object_store_output_is_checked_through_filesystems(object_store, earlier):
    out = "objstore://bucket/out"
    manifest = (earlier[1] / "manifest.json").read_bytes()
    object_store[f"{out}/part-00000-of-00001.parquet"] = b"part"
    with pytest.raises(InputError, match=r"no manifest\.json"):  # parts alone: not known as ours
        check_output(out)
    # A publish cut short (old manifest deleted, new one not yet written) left its marker.
    object_store["objstore://bucket/.out.beam-enrich/publishing"] = b"{}"
    assert check_output(out + "/") == out
    object_store[f"{out}/manifest.json"] = manifest
    object_store[f"{out}/analysis/figure.png"] = b"png"
    with pytest.raises(InputError, match="earlier beam-enrich output but also holds analysis/"):
        check_output(out)
    with pytest.raises(InputError, match="contains input file"):
        check_output("objstore://bucket", ["objstore://bucket/in/reviews.parquet"])


def test_object_store_lock_refuses_a_second_run_and_is_removed_after(object_store):
    out = "objstore://bucket/out"
    with (
        lock_output(out, "first-run"),
        pytest.raises(InputError, match="run id first-run") as refused,
        lock_output(out, "second-run"),
    ):
        pass
    assert "delete objstore://bucket/.out.beam-enrich/lock" in str(refused.value)
    assert object_store == {}


def test_object_store_publish_cut_short_is_replaced_by_the_next_run(
    object_store, earlier, monkeypatch, capsys
):
    spec, _ = earlier
    out = "objstore://bucket/out"
    args = ["--input", str(INPUT), "--output", out, "--spec", str(spec), "--limit", "4"]
    assert main([*args, "--quiet"]) == 0
    first_run = json.loads(object_store[f"{out}/manifest.json"])["run_id"]

    def fail(*args, **kwargs):
        raise OSError("connection reset")

    # The old output is deleted and the new parts copied; then the publish fails.
    with monkeypatch.context() as patch:
        patch.setattr(pipelines.output, "concatenate_files", fail)
        assert main([*args, "--quiet"]) == 1
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith(
            f"{out} holds no complete output (the previous one was being replaced and has no "
            "manifest.json); run again"
        )
    )
    assert f"{out}/manifest.json" not in object_store
    assert f"{out}/part-00000-of-00001.parquet" in object_store

    assert main([*args, "--quiet"]) == 0
    assert json.loads(object_store[f"{out}/manifest.json"])["run_id"] != first_run
    assert not [path for path in object_store if "/.out.beam-enrich/" in path]  # no lock left
