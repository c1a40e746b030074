"""The built-in demo model: a small ViT classifier in pure torch (needs nothing but torch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.zoo.case import ModelCase


class _Block(nn.Module):
    """Pre-norm transformer block with explicit q/k/v so the graph shows every op."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyViT(nn.Module):
    """A minimal ViT classifier in pure torch: the demo model that needs no transformers."""

    def __init__(self, image=32, patch=4, channels=3, dim=64, depth=2, heads=4, mlp_ratio=4, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def tiny_vit(batch: int = 2) -> ModelCase:
    """32x32 RGB, patch 4 (64 tokens + CLS), dim 64, 2 blocks, 4 heads, 10 classes."""
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(batch, 3, 32, 32)
    return ModelCase("tiny_vit", model, (x,), {}, {"x": 0})
