"""On-demand benchmarks: raw runtimes, end to end against the old back end's re-creation, overhead, cold start."""

# Every figure names the instruction sets it ran on, since an AVX2 box and an AVX-512 VNNI one
# differ (docs/int8.md); the appliance's proofs read them the same way.
from appliance.inference.proof import instruction_sets as instruction_sets
