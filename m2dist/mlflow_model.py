"""The MLflow pyfunc model of an m2dist release folder, defined from code: nothing is pickled.

`m2dist.tracking.save_mlflow_model` saves this file as the model's code and the release folder
(model.safetensors, config.json, tokenizer) as its artifact `release`. `mlflow.pyfunc.load_model`
runs this file, which needs m2dist importable, and `load_context` rebuilds the model with
`load_release`. `predict` takes token ids, (B, L) integers, as an array, a list of lists or a dict
with `input_ids` (and optionally `attention_mask`, `token_type_ids`), and returns the model's
logits as a float32 array: (B, L, vocab) for a masked LM, (B, num_labels) for a classifier.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    return np.asarray(value, dtype=np.int64)


class M2ReleaseModel(mlflow.pyfunc.PythonModel):
    """An m2dist MaskedLM or SequenceClassifier served from its release folder."""

    def load_context(self, context) -> None:
        # Imported here, as torch in predict: MLflow runs this file when it logs the model, and only
        # serving needs torch.
        from m2dist.checkpoint.release import load_release

        self.model = load_release(context.artifacts["release"]).eval()

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import torch

        inputs = model_input if isinstance(model_input, dict) else {"input_ids": model_input}
        if "input_ids" not in inputs:
            raise ValueError(f"expected token ids or a dict with 'input_ids', got keys {sorted(inputs)}")
        tensors = {key: torch.from_numpy(_as_array(inputs[key])) for key in MODEL_INPUTS if key in inputs}
        if tensors["input_ids"].dim() != 2:
            raise ValueError(f"expected input_ids of shape (batch, length), got {tuple(tensors['input_ids'].shape)}")
        with torch.no_grad():
            return self.model(**tensors).logits.float().numpy()


mlflow.models.set_model(M2ReleaseModel())
