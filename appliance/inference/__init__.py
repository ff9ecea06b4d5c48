"""Model loading, the inference runtimes and the batching scheduler in front of them."""
