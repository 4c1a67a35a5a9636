"""Shared fixtures: tiny offline models, built once per test session."""

from __future__ import annotations

import os
import pickle

# Before anything imports huggingface_hub: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO / "sample_data"


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; two oversubscribe a busy 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Task family -> directory of a tiny random-weight model with a real tokenizer."""
    from transformers.utils import logging as hf_logging

    from pipelines.test_models import make_test_models

    hf_logging.disable_progress_bar()
    return make_test_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    """The sample data's texts: reviews and news of natural, varied lengths."""
    import pyarrow.parquet as pq

    return pq.read_table(SAMPLE_DATA / "reviews.parquet").column("text").to_pylist()


def fake_hub_cache(cache: Path, repo_id: str, model_dir: Path, commit: str) -> None:
    """Lays a model out as huggingface_hub caches a download of `main` at `commit`."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def sentiment_ner_spec(models: dict, **top) -> dict:
    """A job spec (as parsed YAML) running sentiment and ner with the tiny models."""
    return {
        "rows_per_chunk": 8,
        **top,
        "tasks": [
            {
                "name": "sentiment",
                "task": "sentiment-analysis",
                "model": str(models["text-classification"]),
            },
            {"name": "entities", "task": "ner", "model": str(models["token-classification"])},
        ],
    }


def read_local_parts(output: Path) -> pa.Table:
    """A local output's part files, concatenated in name order.

    Here, not in a test module: a test module imported by another one would be loaded
    twice (as `test_x` by pytest and as `tests.test_x`), defining its classes twice.
    """
    parts = sorted(output.glob("part-*.parquet"))
    assert parts, f"no part files in {output}"
    return pa.concat_tables(pq.read_table(part) for part in parts)


class EchoRunner:
    """Upper-cases its rows; a row's cost is its length; rows holding "BOOM" raise."""

    def prepare(self, texts):
        return list(texts)

    def cost(self, item):
        return len(item)

    def infer(self, items):
        if any("BOOM" in item for item in items):
            raise RuntimeError("model exploded")
        return [(item.upper(),) for item in items]


class FakeProxy:
    """Stands for a `MultiProcessShared` proxy: another object than the `LoadedModel`,
    whose calls pickle their arguments and answers, as a proxy's do."""

    def __init__(self, loaded):
        self._loaded = loaded
        self.calls = []

    def placement(self):
        return self._loaded.placement()

    def forward(self, batch):
        self.calls.append(1)
        answer = self._loaded.forward(pickle.loads(pickle.dumps(batch)))
        return pickle.loads(pickle.dumps(answer))

    def forward_many(self, batches):
        self.calls.append(len(batches))
        answer = self._loaded.forward_many(pickle.loads(pickle.dumps(batches)))
        return pickle.loads(pickle.dumps(answer))

    def run_measured(self, *args, **kwargs):
        raise AssertionError("the server ran a whole chunk")


#: Test files that take longest on 2 cores, slowest first (`--durations`, Zen 3, 2 cores).
#: xdist's `--dist loadfile` hands out files with the most tests first, which leaves these
#: end-to-end files, with few tests each, for the end, where one process finishes long
#: after the other. Handed out first, the many short files fill the gaps at the end.
SLOWEST_FILES = (
    "test_distributed.py",
    "test_task_seq2seq.py",
    "test_atomic_resume.py",
    "test_task_chat.py",
    "test_hot_path.py",
    "test_cli.py",
    "test_clean_runs.py",
    "test_generation_front.py",
    "test_task_text_generation.py",
    "test_reliability.py",
    "test_runners.py",
    "test_tables.py",
    "test_cli_tools.py",
    "test_real_model.py",
    "test_tasks.py",
    "test_task_embeddings.py",
    "test_output_safety.py",
    "test_hub_cache.py",
    "test_gpu_script.py",
)


def pytest_collection_modifyitems(config, items):
    """The slowest files first, each file's tests together and in their own order."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` in collection order (slowest files first), not by test count."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)
