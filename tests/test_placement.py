"""Placing a model: the `compile` option, from the spec to the loaded model."""

from __future__ import annotations

import torch

from pipelines.spec import parse_spec
from transforms.inference import TaskBinding, load_task
from transforms.models import compiling, place_model, resolve_model
from transforms.tasks.text_classification import TextClassification


def test_place_model_compiles_only_inside_compiling():
    with compiling(True):
        compiled = place_model(torch.nn.Linear(4, 4), "cpu", "fp32")
    plain = place_model(torch.nn.Linear(4, 4), "cpu", "fp32")
    # Module.compile sets the compiled call in place; the module keeps its type.
    assert isinstance(compiled, torch.nn.Linear)
    assert compiled._compiled_call_impl is not None
    assert plain._compiled_call_impl is None


def test_compile_option_flows_from_spec_to_the_loaded_model(tiny_models):
    path = str(tiny_models["text-classification"])
    spec = parse_spec({"tasks": [{"name": "s", "task": "sentiment-analysis", "model": path}]})
    assert spec.tasks[0].compile is False
    spec = parse_spec(
        {"tasks": [{"name": "s", "task": "sentiment-analysis", "model": path, "compile": True}]}
    )
    assert spec.tasks[0].compile is True

    def loaded_model(compile_: bool):
        binding = TaskBinding(
            TextClassification("s"), resolve_model(path), device="cpu", compile=compile_
        )
        return load_task(binding).runner.pipe.model

    assert loaded_model(True)._compiled_call_impl is not None
    assert loaded_model(False)._compiled_call_impl is None
