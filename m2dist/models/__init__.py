"""M2-BERT and the BERT baseline, built from a `ModelConfig`."""

from m2dist.config import ModelConfig
from m2dist.models.model import (
    ClassifierOutput,
    Encoder,
    MaskedLM,
    MaskedLMOutput,
    SequenceClassifier,
    count_parameters,
    masked_capacity,
)


def build_masked_lm(config: ModelConfig) -> MaskedLM:
    return MaskedLM(config)


def build_classifier(config: ModelConfig, num_labels: int) -> SequenceClassifier:
    return SequenceClassifier(config, num_labels)


__all__ = [
    "ClassifierOutput",
    "Encoder",
    "MaskedLM",
    "MaskedLMOutput",
    "SequenceClassifier",
    "build_classifier",
    "build_masked_lm",
    "count_parameters",
    "masked_capacity",
]
