"""A LLaVA-style vision-language model from configs with random weights."""
from __future__ import annotations

import torch

from graphopt.zoo.case import ModelCase


def llava(text_len: int = 24, attn_implementation: str = "sdpa", *, batch: int = 2, image: int = 32, patch: int = 8,
          vision_hidden: int = 64, vision_layers: int = 2, text_hidden: int = 64, text_layers: int = 2,
          vocab: int = 300, vision_feature_layer: int = -1, max_positions: int = 128) -> ModelCase:
    """LLaVA-style VLM from configs with random weights: CLIP vision tower (by default 2x64, 32px, patch 8
    -> 16 visual tokens), a 2-layer MLP connector, and a Llama language model (2x64, 4 heads, SwiGLU,
    RMSNorm, rotary positions); MLPs twice as wide as the model. ``text_len`` tokens per row, the image's
    tokens among them (from position 1). The model fixes the batch at capture (capture with
    dynamic_batch=False)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image,
                              patch_size=patch)
    text = LlamaConfig(hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab,
                       max_position_embeddings=max_positions)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1,
                         vision_feature_layer=vision_feature_layer, attn_implementation=attn_implementation)
    model = LlavaForConditionalGeneration(config).eval()
    visual_tokens = (vision.image_size // vision.patch_size) ** 2
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, vocab - 2, (batch, text_len), generator=generator)
    input_ids[:, 1:1 + visual_tokens] = config.image_token_index
    pixel_values = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator)
    return ModelCase("llava", model, (), {"input_ids": input_ids, "pixel_values": pixel_values, "use_cache": False},
                     {}, config)
