"""The BERT-base baseline layer: post-LN self-attention through scaled_dot_product_attention and a
dense GELU MLP. Names follow Hugging Face's BertLayer, so bert-base weights map onto it.

Shape legend: B batch, L sequence length, D hidden size, H heads, K head size.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from m2dist.config import ModelConfig


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.dropout_p = config.attention_dropout

    def forward(self, h_BLD: torch.Tensor, attention_mask_BL: torch.Tensor | None) -> torch.Tensor:
        batch, length, d = h_BLD.shape

        def heads(x_BLD: torch.Tensor) -> torch.Tensor:
            return x_BLD.view(batch, length, self.num_heads, d // self.num_heads).transpose(1, 2)

        mask_B11L = None
        if attention_mask_BL is not None:
            mask_B11L = attention_mask_BL.bool()[:, None, None, :]
        out_BHLK = F.scaled_dot_product_attention(
            heads(self.query(h_BLD)), heads(self.key(h_BLD)), heads(self.value(h_BLD)),
            attn_mask=mask_B11L, dropout_p=self.dropout_p if self.training else 0.0,
        )  # fmt: skip
        return out_BHLK.transpose(1, 2).reshape(batch, length, d)


class DenseResidualNorm(nn.Module):
    """LayerNorm(dropout(dense(x)) + residual): the output block after attention and after the MLP."""

    def __init__(self, in_features: int, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self = SelfAttention(config)
        self.output = DenseResidualNorm(config.hidden_size, config)

    def forward(self, h_BLD: torch.Tensor, attention_mask_BL: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(h_BLD, attention_mask_BL), h_BLD)


class Intermediate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = DenseResidualNorm(config.intermediate_size, config)

    def forward(self, h_BLD: torch.Tensor, attention_mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        h_BLD = self.attention(h_BLD, attention_mask_BL)
        return self.output(self.intermediate(h_BLD), h_BLD)
