"""The hot path without Beam: `transforms.inference` imports and runs with no apache_beam."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, FakeProxy
from transforms.inference import TaskBinding, load_task, run_rows
from transforms.model_server import with_local_front
from transforms.models import resolve_model
from transforms.tasks.base import check_text
from transforms.tasks.feature_extraction import FeatureExtraction
from transforms.tasks.fill_mask import FillMask, FillMaskParams
from transforms.tasks.question_answering import QuestionAnswering, QuestionAnsweringParams
from transforms.tasks.text_classification import TextClassification
from transforms.tasks.token_classification import TokenClassification
from transforms.tasks.zero_shot import ZeroShotClassification, ZeroShotClassificationParams

_NO_BEAM = """
import json, sys
sys.modules["apache_beam"] = None  # any import of apache_beam now raises ImportError
from transforms.inference import TaskBinding, load_task, run_rows
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


_MASKED = [
    "The committee met in {mask} to discuss the report.",
    "A lovely kettle, it boils {mask} fast.",
    "{mask}",
    "No mask in this one.",
    "Shipping took a {mask} and the box was crushed on arrival, again.",
]


def _encoder_tasks():
    return [
        ("text-classification", TextClassification("s")),
        ("token-classification", TokenClassification("ner")),
        (
            "zero-shot-classification",
            ZeroShotClassification(
                "z", ZeroShotClassificationParams(candidate_labels=("kitchen", "travel", "news"))
            ),
        ),
        ("fill-mask", FillMask("f", FillMaskParams(top_k=3))),
        (
            "question-answering",
            QuestionAnswering("qa", QuestionAnsweringParams(question="What happened?")),
        ),
        ("feature-extraction", FeatureExtraction("emb")),
    ]


@pytest.mark.parametrize("family, adapter", _encoder_tasks(), ids=lambda v: getattr(v, "name", v))
def test_served_model_gets_forward_passes_only_and_gives_the_same_rows(
    tiny_models, sample_texts, family, adapter
):
    task = TaskBinding(adapter, resolve_model(str(tiny_models[family])), device="cpu")
    loaded = load_task(task)
    proxy = FakeProxy(loaded)
    local = with_local_front(task, proxy)
    assert local is not proxy and local is with_local_front(task, proxy)

    texts = [*_MASKED, *sample_texts[:20]] if family == "fill-mask" else sample_texts[:25]
    inputs = adapter.row_inputs({"text": [*texts, None]})
    budget = 64 if family == "fill-mask" else 300  # several micro-batches each
    served = local.run_measured(inputs, budget)
    direct = loaded.run_measured(inputs, budget)
    # One call per chunk, holding every micro-batch.
    assert proxy.calls == [len(served.batches)] and len(served.batches) > 1
    assert served.errors == direct.errors
    np.testing.assert_equal(served.results, direct.results)  # embeddings: arrays, bit for bit
    assert served.truncated == direct.truncated


class _NoFront(TextClassification):
    """A family (a plugin's, say) that does not split: no `load_front`."""

    def load_front(self, model):
        return None


def test_a_family_without_a_front_runs_whole_chunks_in_the_server(tiny_models):
    task = TaskBinding(
        _NoFront("s"), resolve_model(str(tiny_models["text-classification"])), device="cpu"
    )
    proxy = FakeProxy(None)
    assert with_local_front(task, proxy) is proxy


def test_every_encoder_family_through_a_model_server_gives_the_in_process_output(
    tmp_path, tiny_models, sample_texts
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.cli import main

    texts = [*_MASKED, *sample_texts[:27]]
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), source)
    tasks = [
        ("sentiment", "sentiment-analysis", "text-classification", {}),
        ("ner", "ner", "token-classification", {}),
        (
            "zs",
            "zero-shot-classification",
            "zero-shot-classification",
            {"candidate_labels": ["kitchen", "travel", "news"]},
        ),
        ("fill", "fill-mask", "fill-mask", {"top_k": 3}),
        ("qa", "question-answering", "question-answering", {"question": "What happened?"}),
        ("embedding", "feature-extraction", "feature-extraction", {}),
    ]
    outputs = {}
    for share in ("process", "machine"):
        spec = tmp_path / f"{share}.yaml"
        spec.write_text(
            json.dumps(
                {
                    "rows_per_chunk": 8,
                    "tasks": [
                        {
                            "name": name,
                            "task": task,
                            "model": str(tiny_models[family]),
                            "share_model": share,
                            "max_batch_tokens": 300,
                            "params": params,
                        }
                        for name, task, family, params in tasks
                    ],
                }
            )
        )
        output = tmp_path / share
        argv = ["--input", str(source), "--output", str(output), "--spec", str(spec)]
        if share == "machine":  # two SDK processes share each model's server
            argv += ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
        assert main(argv) == 0
        parts = sorted(output.glob("part-*.parquet"))
        outputs[share] = pa.concat_tables(pq.read_table(p) for p in parts).sort_by("id")
    assert outputs["machine"].equals(outputs["process"])
    rows = outputs["machine"].to_pylist()
    assert all(row["sentiment_label"] is not None and row["qa_answer"] is not None for row in rows)
    assert sum(row["fill"] is not None for row in rows) == 4  # the rows with one mask


class SplitUpper:
    """A split runner: upper-cases rows; a micro-batch holding "BOOM" fails its forward."""

    def __init__(self):
        self.forwards = []

    def prepare(self, texts):
        return list(texts)

    def cost(self, item):
        return len(item)

    def collate(self, items):
        return {"rows": list(items)}

    def forward(self, batch):
        self.forwards.append(len(batch["rows"]))
        if any("BOOM" in row for row in batch["rows"]):
            raise RuntimeError("model exploded")
        return {"upper": [row.upper() for row in batch["rows"]]}

    def decode(self, items, outputs):
        return [(value,) for value in outputs["upper"]]

    def infer(self, items):
        return self.decode(items, self.forward(self.collate(items)))


def test_overlapped_micro_batches_give_the_same_rows_and_isolate_failures():
    texts = [f"row {i} " + "x" * (i % 7) for i in range(40)]
    texts[13] = "BOOM " + texts[13]
    inputs = [check_text(t) for t in [*texts, None]]
    sequential = run_rows(SplitUpper(), inputs, 40)
    runner = SplitUpper()
    overlapped = run_rows(runner, inputs, 40, overlap=True)

    assert len(overlapped.batches) > 3
    assert overlapped.results == sequential.results
    assert overlapped.errors == sequential.errors
    assert overlapped.errors[13] == "RuntimeError: model exploded"
    assert sum(error is not None for error in overlapped.errors) == 2
    assert overlapped.results[12] == (texts[12].upper(),)
