"""On-demand benchmarks: raw runtimes, end to end against the old back end's re-creation, overhead, cold start."""
