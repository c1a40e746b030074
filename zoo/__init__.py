"""Model zoo: small, deterministic models for tests, benchmarks and demos.

Every builder returns a :class:`ModelCase` holding an eval-mode model plus example
inputs, so callers can run, export (``torch.export`` with a symbolic batch) and
compare optimised graphs against the float model without knowing model specifics.
Random weights are seeded inside each builder so repeated builds are identical.
``transformers``/``sklearn`` are imported lazily: ``tiny_vit`` (the built-in demo)
needs nothing but torch.

The modules: ``case`` (ModelCase), ``tiny_vit`` (the pure-torch demo model), ``vision`` (HF
DeiT-S, CLIP vision), ``text`` (HF BERT, GPT-2), ``minilm`` (the real all-MiniLM-L6-v2),
``multimodal`` (LLaVA-style), ``digits`` (the ViT trained on sklearn digits) and ``sentences``.
"""
from graphopt.zoo.case import ModelCase
from graphopt.zoo.digits import DigitsCase, cache_dir, digits_vit
from graphopt.zoo.minilm import minilm, minilm_embed, minilm_model, minilm_tokenizer
from graphopt.zoo.multimodal import llava
from graphopt.zoo.sentences import sentences
from graphopt.zoo.text import bert, gpt2
from graphopt.zoo.tiny_vit import TinyViT, tiny_vit
from graphopt.zoo.vision import clip_vision, deit_distilled_small, deit_small

__all__ = ["DigitsCase", "ModelCase", "TinyViT", "bert", "cache_dir", "clip_vision", "deit_distilled_small",
           "deit_small", "digits_vit", "gpt2", "llava", "minilm", "minilm_embed", "minilm_model", "minilm_tokenizer",
           "sentences", "tiny_vit"]
