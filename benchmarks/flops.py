"""Model FLOPs of an encoder's forward pass, and this CPU's peak for each dtype.

Achieved FLOP/s = the FLOPs the model must do for the rows (real tokens, padding not
counted: padding is waste, not work) / the seconds they took. Set beside the CPU's peak
for the dtype, it says how far a loop is from the machine's limit.
"""

from __future__ import annotations

__all__ = ["FLOPS_PER_CYCLE", "encoder_flops", "peak_flops"]

#: Per core and clock cycle, the dense multiply-add throughput of the widest unit that
#: runs the dtype (a multiply-add counts 2), from Intel's and AMD's optimisation manuals:
#: fp32: two 512-bit FMA ports (16 lanes x 2 x 2 = 64) with AVX-512, two 256-bit with AVX2;
#: bf16: AMX-BF16 tiles 1024, AVX512_BF16 `vdpbf16ps` 2 ports x 32 pairs x 2 = 128, else
#: emulated through fp32; int8: AMX-INT8 2048, AVX-512 VNNI 2 ports x 64 x 2 = 256, AVX-VNNI
#: or AVX2 128. torch's dynamic int8 Linear runs oneDNN/fbgemm kernels that use VNNI or AMX.
FLOPS_PER_CYCLE = {
    "fp32": (("avx512f", 64), ("avx2", 32)),
    "bf16": (("amx_bf16", 1024), ("avx512_bf16", 128), ("avx512f", 64), ("avx2", 32)),
    "int8": (("amx_int8", 2048), ("avx512_vnni", 256), ("avx_vnni", 128), ("avx2", 128)),
}


def encoder_flops(config, lengths: list[int]) -> float:
    """FLOPs of one forward pass of a BERT-style encoder over rows of these token lengths.

    Per layer and row of n tokens: the four attention projections (4 d^2 weights) and
    the feed-forward pair (2 d f weights) cost 2 x weights x n; the attention scores
    (Q K^T) and their weighted sum (A V) cost 2 n^2 d each. Embedding look-ups, layer
    norms and the small classifier head are left out (under 1 % here).
    """
    d = config.hidden_size
    layers = config.num_hidden_layers
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None)
    if ffn is None:
        ffn = 4 * d
    weights = 4 * d * d + 2 * d * ffn
    return float(sum(layers * (2 * weights * n + 4 * n * n * d) for n in lengths))


def peak_flops(machine: dict, dtype: str) -> dict | None:
    """The dtype's peak FLOP/s on the measured machine: cores x clock x FLOPs per cycle.

    `machine` is `benchmarks.report.machine()`. The clock is /proc/cpuinfo's nominal
    `cpu MHz` (turbo may run higher, AMX may run lower); a virtual machine's vCPUs are
    taken as cores. None when the clock or flags are unknown.

    Returns:
        {"flops_per_s", "unit" (the flag whose unit sets it), "flops_per_cycle_per_core"}.
    """
    mhz = machine.get("cpu_mhz")
    flags = set(machine.get("cpu_flags") or ())
    if not mhz or dtype not in FLOPS_PER_CYCLE:
        return None
    cores = machine.get("cores_usable") or machine.get("cores") or 1
    for flag, per_cycle in FLOPS_PER_CYCLE[dtype]:
        if flag in flags:
            return {
                "flops_per_s": cores * mhz * 1e6 * per_cycle,
                "unit": flag,
                "flops_per_cycle_per_core": per_cycle,
            }
    return None
