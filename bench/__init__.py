"""On-demand benchmarks: raw runtimes, end to end against the old back end's re-creation, overhead, cold start."""


# The instruction sets that change what a CPU's INT8 (and bf16) kernels compute and how fast
# (docs/int8.md): every figure names them, since an AVX2 box and an AVX-512 VNNI one differ.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def instruction_sets() -> list[str]:
    """Which of ISA_FLAGS this CPU has, from /proc/cpuinfo (empty where there is none)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in ISA_FLAGS if f in flags]
