"""Hugging Face vision encoders from configs with random weights (DeiT-S shapes, a small CLIP tower)."""
from __future__ import annotations

import torch

from graphopt.zoo.case import ModelCase, hf_case, images


_DEIT_S = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
               image_size=224, patch_size=16, num_labels=1000)


def deit_small(batch: int = 2, attn_implementation: str = "sdpa") -> ModelCase:
    """DeiT-S/16 shape as HF ``ViTForImageClassification`` (random weights, ~22M params)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(**_DEIT_S, attn_implementation=attn_implementation)
    return hf_case("deit_small", ViTForImageClassification(config), pixel_values=images(batch, 3, 224))


def deit_distilled_small(batch: int = 2, attn_implementation: str = "sdpa") -> ModelCase:
    """DeiT-S/16 with the distillation token and teacher head (``DeiTForImageClassificationWithTeacher``)."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(0)
    config = DeiTConfig(**_DEIT_S, attn_implementation=attn_implementation)
    return hf_case("deit_distilled_small", DeiTForImageClassificationWithTeacher(config),
                    pixel_values=images(batch, 3, 224))


def clip_vision(batch: int = 2, attn_implementation: str = "sdpa") -> ModelCase:
    """Small random ``CLIPVisionModel`` (4x256, 4 heads, 64x64 image, patch 8): pre-LN + quick_gelu variant."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                              image_size=64, patch_size=8, attn_implementation=attn_implementation)
    return hf_case("clip_vision", CLIPVisionModel(config), pixel_values=images(batch, 3, 64))
