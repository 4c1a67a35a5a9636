"""The benchmark's results as the machine they came from, a chart and Markdown tables."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

__all__ = [
    "SPEED_FLAGS",
    "add_parts_options",
    "chosen_parts",
    "cpu_kind",
    "cpu_label",
    "machine",
    "markdown",
    "plot",
    "save_results",
]

_PACKAGES = ("torch", "transformers", "apache-beam", "pyarrow", "tokenizers")
_METHODS = ("per-row", "pipeline(list, 32)", "beam-enrich")


#: The CPU flags that decide which speed mode is fast: AVX-512 and AMX run bf16 and int8
#: natively; without AVX512_BF16 / AMX torch emulates bf16 (several times slower than fp32).
SPEED_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx_vnni",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo; empty where there is none."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if not line.strip():
                    break  # the first processor's block ends at the first blank line
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass  # not Linux: callers fall back to what platform says
    return fields


def cpu_kind(flags: set[str]) -> str:
    """What the CPU's flags mean for the speed modes, in words for tables."""
    if {"amx_bf16", "amx_int8"} <= flags:
        return "AMX bf16/int8 (Sapphire Rapids class)"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16 (bf16 native, no AMX)"
    if "avx512f" in flags:
        return "AVX-512 without BF16 (bf16 emulated)"
    if "avx2" in flags:
        return "AVX2 (bf16 emulated)"
    return "no AVX2"


def add_parts_options(parser, parts: tuple[str, ...]) -> None:
    """`--only PARTS` and `--json FILE`, for a benchmark made of parts run separately."""
    parser.add_argument(
        "--only",
        default=",".join(parts),
        help=f"comma-separated parts to run, of {','.join(parts)} (default: all)",
    )
    parser.add_argument(
        "--json", help="also write the results to this file (other parts' results kept)"
    )


def chosen_parts(parser, args, parts: tuple[str, ...]) -> set[str]:
    """The parts `--only` names; an unknown one is a usage error."""
    chosen = set(args.only.split(","))
    if not chosen <= set(parts):
        parser.error(f"--only: unknown part(s) {sorted(chosen - set(parts))}; use {parts}")
    return chosen


def save_results(path: Path, results: dict) -> None:
    """Writes a benchmark's results as indented JSON, making its folder, and says where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


def cpu_label(machine: dict) -> str:
    """The CPU and what its flags mean, for tables: which CPU measured a row."""
    if "cpu_kind" in machine:
        return f"{machine['cpu']}, {machine['cpu_kind']}"
    return f"{machine['cpu']} (flags not recorded)"


def machine() -> dict:
    """CPU model and speed-relevant flags, cores, torch threads and library versions."""
    import torch

    info = _cpuinfo()
    cpu = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    mhz = info.get("cpu MHz")
    return {
        "cpu": cpu,
        "cpu_kind": cpu_kind(flags),
        "cpu_flags": [flag for flag in SPEED_FLAGS if flag in flags],
        "cpu_mhz": round(float(mhz)) if mhz else None,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: metadata.version(name) for name in _PACKAGES},
    }


def plot(results: dict, path: Path) -> None:
    """Writes a PNG: ratios to the bare loop per task and method (with the 0.9 line) and,
    when measured, each speed mode's bare-loop speed-up with its agreement to fp32."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = {task: r["ratio_to_bare"] for task, r in results["throughput"].items()}
    ratios.update({task: r["ratio_to_bare"] for task, r in results["generation"].items()})
    modes = {task: m for task, m in results["dtypes"].items() if len(m) > 1}
    panels = [p for p, shown in (("ratios", ratios), ("modes", modes)) if shown]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for axis, panel in zip(axes[0], panels, strict=True):
        if panel == "ratios":
            _grouped_bars(axis, ratios, _METHODS, lambda r, method: r.get(method))
            axis.axhline(0.9, color="red", linestyle="--", linewidth=1, label="0.9x target")
            axis.set_ylabel("throughput / bare loop")
            axis.set_title("fp32: each method against the bare batched loop")
        else:
            dtypes = [d for d in ("fp32", "bf16", "int8") if any(d in m for m in modes.values())]
            bars = _grouped_bars(
                axis, modes, dtypes, lambda m, dtype: (m.get(dtype) or {}).get("bare_x_fp32_bare")
            )
            for bar, (task, dtype) in bars:
                agree = modes[task].get(dtype, {}).get("agreement_bare")
                if agree is not None:
                    axis.annotate(
                        f"{agree:.3f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
            for dtype, target in results["targets"]["bare_x_fp32_bare"].items():
                if dtype in dtypes:
                    axis.axhline(target, linestyle=":", linewidth=1, color="grey")
            axis.set_ylabel("bare loop speed / fp32 bare loop")
            axis.set_title("speed modes (labels: agreement with fp32 / mean cosine)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _grouped_bars(axis, by_task: dict, series, value) -> list:
    """One group of bars per task, one bar per series; returns [(bar, (task, series))]."""
    tasks = list(by_task)
    series = [name for name in series if any(value(by_task[t], name) is not None for t in tasks)]
    width = 0.8 / max(1, len(series))
    drawn = []
    for offset, name in enumerate(series):
        xs, heights, keys = [], [], []
        for x, task in enumerate(tasks):
            height = value(by_task[task], name)
            if height is not None:
                xs.append(x + (offset - (len(series) - 1) / 2) * width)
                heights.append(height)
                keys.append((task, name))
        if xs:
            drawn += zip(axis.bar(xs, heights, width, label=name), keys, strict=True)
    axis.set_xticks(range(len(tasks)), tasks, fontsize=8)
    return drawn


def markdown(results: dict) -> str:
    """The results as Markdown tables, ready to paste into the README."""
    m = results["machine"]
    cpus = _CpuKeys()
    kind = f"{m['cpu_kind']}; flags {', '.join(m['cpu_flags'])}; " if "cpu_flags" in m else ""
    lines = [
        f"Measured on {m['cpu']} ({kind}{m['cores']} cores, torch threads "
        f"{m['torch_threads']}), torch {m['versions']['torch']}, transformers "
        f"{m['versions']['transformers']}, apache-beam {m['versions']['apache-beam']}.",
    ]
    if results["throughput"]:
        lines += [
            "",
            "| task | bare rows/s | per-row | pipeline(list, 32) | beam-enrich | CPU |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for task, r in results["throughput"].items():
            cells = [_ratio(r["ratio_to_bare"].get(method)) for method in _METHODS]
            lines.append(
                f"| {task} | {r['rows_per_s']['bare']:.1f} | {' | '.join(cells)} | {cpus.key(r)} |"
            )
        lines.append("")
        lines.append("Ratios to the bare loop (pre-tokenized, length-sorted batches of 32).")
    modes = {task: m for task, m in results["dtypes"].items() if len(m) > 1}
    if modes:
        lines += [
            "",
            "| task | dtype | bare vs fp32 bare | beam-enrich vs fp32 bare "
            "| beam-enrich vs own bare | agreement with fp32 | TFLOP/s (share of peak) | CPU |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for task, by_dtype in modes.items():
            for dtype, d in by_dtype.items():
                kind = "cosine " if task == "embeddings" else ""
                lines.append(
                    f"| {task} | {dtype} | {_ratio(d['bare_x_fp32_bare'])} | "
                    f"{_ratio(d['beam_enrich_x_fp32_bare'])} | "
                    f"{_ratio(d.get('beam_enrich_x_same_dtype_bare'))} | "
                    f"{kind}{d['agreement_bare']:.3f} / {d['agreement_beam_enrich']:.3f} | "
                    f"{_flops(d)} | {cpus.key(d)} |"
                )
        lines.append("")
        lines.append(
            "Agreement: bare loop / beam-enrich output, each against its fp32 run (labels: "
            "share equal; ner: token labels / whole rows' entities; embeddings: mean cosine)."
        )
    if results["generation"]:
        lines += [
            "",
            "| task | bare new tokens/s | per-row | beam-enrich | beam-enrich vs per-row | CPU |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for task, g in results["generation"].items():
            lines.append(
                f"| {task} | {g['new_tokens_per_s']['bare']:.1f} | "
                f"{_ratio(g['ratio_to_bare'].get('per-row'))} | "
                f"{_ratio(g['ratio_to_bare']['beam-enrich'])} | "
                f"{_ratio(g['beam_enrich_x_per_row'])} | {cpus.key(g)} |"
            )
        lines.append("")
        lines.append("Greedy, 32 new tokens per row; ratios to length-sorted batches of 16.")
    if results["memory"]:
        lines += ["", "| input rows | peak RSS (MiB) | CPU |", "|---:|---:|---|"]
        for rows, run in results["memory"]["runs"].items():
            lines.append(
                f"| {int(rows):,} | {run['peak_rss_mib']:.0f} | {cpus.key(results['memory'])} |"
            )
        lines.append("")
        lines.append(f"Largest / smallest: {results['memory']['ratio']:.2f}x.")
    lines += ["", *(f"CPU {key}: {label}." for label, key in cpus.keys.items())]
    return "\n".join(lines)


class _CpuKeys:
    """Short keys (A, B, …) for the CPUs that measured the rows, in order of first use."""

    def __init__(self):
        self.keys: dict[str, str] = {}

    def key(self, entry: dict) -> str:
        label = entry.get("cpu", "not recorded")
        return self.keys.setdefault(label, chr(ord("A") + len(self.keys)))


def _flops(mode: dict) -> str:
    """Bare loop / beam-enrich model TFLOP/s, with their share of the dtype's peak."""
    if "bare_tflops_per_s" not in mode:
        return "-"
    cell = f"{mode['bare_tflops_per_s']:.2f} / {mode['beam_enrich_tflops_per_s']:.2f}"
    if "peak_tflops_per_s" in mode:
        cell += (
            f" ({mode['bare_share_of_peak']:.1%} / {mode['beam_enrich_share_of_peak']:.1%} "
            f"of {mode['peak_tflops_per_s']:.1f})"
        )
    return cell


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
