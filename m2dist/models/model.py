"""Encoders and heads shared by M2-BERT and the BERT baseline (M2_SPEC 1.4).

`MaskedLM` and `SequenceClassifier` hold the encoder under `bert` and the heads under upstream's
names (`cls.predictions`, `bert.pooler`, `classifier`), so their state dicts are upstream's layout.

Shape legend: B batch, L sequence length, D hidden size, V vocabulary, M masked tokens, C labels.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from m2dist.config import ModelConfig
from m2dist.models.bert import BertLayer
from m2dist.models.m2 import M2Layer, init_weights, layer_long_filters


class Embeddings(nn.Module):
    """word (padding_idx) + token type + learned absolute position -> LayerNorm -> dropout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.l_max = config.l_max
        self.register_buffer("position_ids", torch.arange(config.l_max)[None])
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.l_max, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids_BL: torch.Tensor, token_type_ids_BL: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids_BL.shape[1]
        if length > self.l_max:
            raise ValueError(f"input length {length} exceeds the model's l_max={self.l_max}")
        h_BLD = self.word_embeddings(input_ids_BL) + self.position_embeddings(self.position_ids[:, :length])
        if token_type_ids_BL is None:
            h_BLD = h_BLD + self.token_type_embeddings.weight[0]
        else:
            h_BLD = h_BLD + self.token_type_embeddings(token_type_ids_BL)
        return self.dropout(self.LayerNorm(h_BLD))


class LayerStack(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        layer_cls = M2Layer if config.architecture == "m2" else BertLayer
        self.layer = nn.ModuleList(layer_cls(config) for _ in range(config.num_layers))
        self.activation_checkpointing = config.activation_checkpointing

    def forward(self, h_BLD: torch.Tensor, attention_mask_BL: torch.Tensor | None) -> torch.Tensor:
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        # M2's long-convolution filters depend on L only: all layers' in one batched computation.
        extra = [()] * len(self.layer)
        if isinstance(self.layer[0], M2Layer):
            extra = [(k,) for k in layer_long_filters(list(self.layer), h_BLD.shape[1])]
        for layer, args in zip(self.layer, extra):
            if recompute:
                # Non-reentrant, with the RNG state restored: the recomputation draws the same dropout.
                h_BLD = torch.utils.checkpoint.checkpoint(layer, h_BLD, attention_mask_BL, *args, use_reentrant=False)
            else:
                h_BLD = layer(h_BLD, attention_mask_BL, *args)
        return h_BLD


class Pooler(nn.Module):
    """dense + tanh on the first token ("cls") or on the masked mean over tokens ("mean")."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.mean = config.pool == "mean"

    def forward(self, h_BLD: torch.Tensor, attention_mask_BL: torch.Tensor | None) -> torch.Tensor:
        if not self.mean:
            pooled_BD = h_BLD[:, 0]
        elif attention_mask_BL is None:
            pooled_BD = h_BLD.mean(dim=1)
        else:
            mask_BL1 = attention_mask_BL.to(h_BLD.dtype)[..., None]
            pooled_BD = (h_BLD * mask_BL1).sum(dim=1) / mask_BL1.sum(dim=1)
        return torch.tanh(self.dense(pooled_BD))


class Encoder(nn.Module):
    """Embeddings + layers (+ pooler for classification). (B, L) token ids -> (B, L, D)."""

    def __init__(self, config: ModelConfig, with_pooler: bool = False):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = LayerStack(config)
        self.pooler = Pooler(config) if with_pooler else None

    def forward(
        self,
        input_ids_BL: torch.Tensor,
        attention_mask_BL: torch.Tensor | None = None,
        token_type_ids_BL: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.encoder(self.embeddings(input_ids_BL, token_type_ids_BL), attention_mask_BL)


class PredictionHeadTransform(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(h)))


class LMPredictionHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder tied to the word embeddings, with its own bias."""

    def __init__(self, config: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = PredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.decoder.weight = word_embeddings.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(h))


class MLMHead(nn.Module):
    def __init__(self, config: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = LMPredictionHead(config, word_embeddings)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.predictions(h)


def masked_capacity(num_tokens: int, mlm_probability: float) -> int:
    """Rows a fixed-size MLM gather over `num_tokens` tokens reserves: the mean number of masked
    tokens plus 8 standard deviations of the binomial count (each token is masked on its own with
    `mlm_probability`), so that more are masked about once in 10^15 batches, at most `num_tokens`."""
    mean = num_tokens * mlm_probability
    spread = math.sqrt(num_tokens * mlm_probability * (1.0 - mlm_probability))
    return max(1, min(num_tokens, math.ceil(mean + 8.0 * spread) + 8))


@dataclass
class MaskedLMOutput:
    # Mean cross entropy over the masked tokens (None without labels); NaN when a fixed-size
    # gather (`max_masked`) had fewer rows than the batch has masked tokens.
    loss: torch.Tensor | None
    # (M, V) logits of the gathered positions when labels are given, else (B, L, V) for every token.
    logits: torch.Tensor
    # Number of masked tokens the loss averages over (0 without labels); a device scalar with
    # `max_masked`, so that the step never waits for the host.
    num_masked: int | torch.Tensor
    # (M,) labels of the gathered rows (-100 for the unmasked rows that fill a fixed-size gather);
    # None without labels.
    targets: torch.Tensor | None = None


class MaskedLM(nn.Module):
    """Encoder + tied MLM head; with labels, the head and the loss run on masked positions only."""

    IGNORE_INDEX = -100

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.bert = Encoder(config)
        self.cls = MLMHead(config, self.bert.embeddings.word_embeddings)
        init_weights(self, config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        max_masked: int | None = None,
    ) -> MaskedLMOutput:
        """input_ids, attention_mask, token_type_ids, labels: (B, L); labels -100 where not masked.

        Without `max_masked` the masked positions are found exactly (`nonzero`, which waits for the
        device). With it, the head runs on a fixed `max_masked` rows: the masked positions first,
        then unmasked ones, whose -100 labels leave them out of the loss. Every shape is then fixed,
        with no host sync, as CUDA graphs and `torch.compile` need; the loss is the same.

        With labels, `logits` (for metrics) are detached: as a second differentiable output of a
        compiled forward, their gradient, never given, was materialized as zeros in every backward
        (rows x vocab, 640 MB in bf16 at 32,768 tokens and 30% masking) and copied into the
        CUDA graph's input, on the host, outside the graphs."""
        h_BLD = self.bert(input_ids, attention_mask, token_type_ids)
        if labels is None:
            return MaskedLMOutput(loss=None, logits=self.cls(h_BLD), num_masked=0)
        is_masked = (labels != self.IGNORE_INDEX).flatten()
        if max_masked is None:
            masked_M = is_masked.nonzero().squeeze(1)
        else:
            # A stable sort of the 0/1 "not masked" flags puts the masked positions first, in order.
            masked_M = torch.argsort((~is_masked).to(torch.uint8), stable=True)[:max_masked]
        logits_MV = self.cls(h_BLD.flatten(0, 1).index_select(0, masked_M))
        targets_M = labels.flatten().index_select(0, masked_M)
        loss = F.cross_entropy(logits_MV.float(), targets_M, ignore_index=self.IGNORE_INDEX)
        if max_masked is None:
            return MaskedLMOutput(loss=loss, logits=logits_MV.detach(), num_masked=int(masked_M.numel()), targets=targets_M)
        num_masked = is_masked.sum()
        # More masked tokens than rows would drop some from the loss unseen: make it non-finite.
        loss = torch.where(num_masked <= max_masked, loss, torch.full_like(loss, float("nan")))
        return MaskedLMOutput(loss=loss, logits=logits_MV.detach(), num_masked=num_masked, targets=targets_M)


@dataclass
class ClassifierOutput:
    # MSE for one label (regression), else cross entropy (None without labels).
    loss: torch.Tensor | None
    # (B, C) scores.
    logits: torch.Tensor


class SequenceClassifier(nn.Module):
    """Encoder + pooler + dropout + Linear(D, C); C = 1 is regression (e.g. STS-B)."""

    IGNORE_INDEX = -100

    def __init__(self, config: ModelConfig, num_labels: int):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.config = config
        self.num_labels = num_labels
        self.bert = Encoder(config, with_pooler=True)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_weights(self, config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        """input_ids, attention_mask, token_type_ids: (B, L); labels: (B,) ints, or floats when C = 1.
        Rows labelled IGNORE_INDEX (classes) or NaN (regression) are left out of the loss, which
        averages over the others: the fine-tuning step fills a short batch up with such rows."""
        h_BLD = self.bert(input_ids, attention_mask, token_type_ids)
        if self.num_labels == 1:
            # Regression (STS-B): pooler, classifier and loss in fp32 under autocast; the encoder not.
            with torch.autocast(h_BLD.device.type, enabled=False):
                logits_BC = self._head(h_BLD.float(), attention_mask)
        else:
            logits_BC = self._head(h_BLD, attention_mask)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                target_B = labels.float()
                kept_B = ~target_B.isnan()
                squared_B = (logits_BC.squeeze(-1).float() - target_B.nan_to_num()).square()
                loss = torch.where(kept_B, squared_B, 0.0).sum() / kept_B.sum().clamp(min=1)
            else:
                loss = F.cross_entropy(logits_BC.float(), labels, ignore_index=self.IGNORE_INDEX)
        return ClassifierOutput(loss=loss, logits=logits_BC)

    def _head(self, h_BLD: torch.Tensor, attention_mask_BL: torch.Tensor | None) -> torch.Tensor:
        return self.classifier(self.dropout(self.bert.pooler(h_BLD, attention_mask_BL)))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor (tied decoder, shared Sin) counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
