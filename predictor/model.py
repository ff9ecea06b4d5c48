"""`DermModel`: a model directory as a `kserve.Model`, classified through the appliance's own Classifier."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model

from appliance.config import Config, wanted_path
from appliance.inference.model import LoadedModel, load_model
from appliance.inference.scheduler import Scheduler
from appliance.services import Classifier

from .inputs import read_batch


class DermModel(Model):
    """The v2 `infer` of one model directory: FP32 tensors or encoded images in, `probabilities` out."""

    def __init__(self, name: str | None, config: Config) -> None:
        # The name is the manifest's unless given, so the path is the one the appliance answers on.
        super().__init__(name or "")
        self.asked_name = name
        self.config = config
        self.loaded: LoadedModel | None = None
        self._classifier: Classifier | None = None

    def load(self) -> bool:
        """Verify, load, warm up and self-check the model directory (appliance.inference.model); ModelError if not."""
        config = self.config
        self.loaded = load_model(
            config.model.path,
            wanted_path(config),
            config.runtime.selected,
            max_batch=config.inference.max_batch,
            trusted_keys=config.model.trusted_keys,
        )
        self.name = self.asked_name or self.loaded.manifest.name
        self.ready = True
        return self.ready

    def _classifier_here(self) -> Classifier:
        """The Classifier, made on the first request: its scheduler needs the server's running loop."""
        if self._classifier is None:
            assert self.loaded is not None, "load() first"
            inference = self.config.inference
            scheduler = Scheduler(
                self.loaded.runtime,
                # One inference thread, as in the appliance: the runtime uses every core for one batch.
                ThreadPoolExecutor(1, thread_name_prefix="inference"),
                max_batch=inference.max_batch,
                max_wait_s=inference.max_wait_ms / 1000.0,
                queue_size=inference.queue_size,
            )
            scheduler.start()
            self._classifier = Classifier(
                self.loaded,
                scheduler,
                max_pixels=self.config.imaging.max_pixels,
                decode_executor=ThreadPoolExecutor(inference.decode_threads, thread_name_prefix="decode"),
            )
        return self._classifier

    async def predict(
        self, payload: InferRequest, headers: dict[str, str] | None = None, response_headers: Any = None
    ) -> InferResponse:
        """Classify the request's batch; `probabilities` FP32 [N, classes] in the manifest's label order."""
        assert self.loaded is not None, "load() first"
        manifest = self.loaded.manifest
        classifier = self._classifier_here()
        # Turning JSON numbers into an array is CPU work: off the event loop, as the appliance does.
        batch = await asyncio.get_running_loop().run_in_executor(
            classifier.decode_executor,
            functools.partial(read_batch, payload, manifest, max_rows=self.config.inference.queue_size),
        )
        if batch.images is not None:
            probabilities = await classifier.classify_images(batch.images)
        else:
            assert batch.tensor is not None
            probabilities = await classifier.classify_tensors(batch.tensor)
        output = InferOutput(name=manifest.output_name, shape=list(probabilities.shape), datatype="FP32")
        output.set_data_from_numpy(np.ascontiguousarray(probabilities, dtype=np.float32), binary_data=False)
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            model_version=manifest.version,
            infer_outputs=[output],
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
            # Cheap to send and it names the columns; the appliance gives them in its model metadata.
            parameters={"labels": ",".join(manifest.labels)},
        )

    def get_input_types(self) -> list[dict[str, Any]]:
        """The model metadata's one input: a preprocessed tensor (FP32) or encoded images (BYTES)."""
        assert self.loaded is not None, "load() first"
        manifest = self.loaded.manifest
        crop = manifest.preprocessing.crop
        return [{"name": manifest.input_name, "datatype": "FP32", "shape": [-1, 3, crop, crop]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        """The model metadata's one output: probabilities in label order."""
        assert self.loaded is not None, "load() first"
        manifest = self.loaded.manifest
        return [{"name": manifest.output_name, "datatype": "FP32", "shape": [-1, len(manifest.labels)]}]
