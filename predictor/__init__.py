"""A KServe predictor for a model directory: `kserve.Model` served by `kserve.ModelServer`.

Central inference on KServe (docs/scaling.md, shape c). It loads a model
directory exactly as the appliance does (appliance.inference.model: file
hashes, signature when `model.trusted_keys` asks, warm-up, golden self-check)
and classifies through the appliance's own `Classifier` (same decode, same
batching), so its answers are the appliance's. Start it with
`python -m predictor --model-dir /mnt/models`.
"""
