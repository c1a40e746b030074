"""Benchmark models, built from ``graphopt.zoo`` (the same models the tests use): name -> builder(batch, seq)
returning a ``ModelCase`` (model, args, kwargs)."""
from __future__ import annotations

import torch


def primary_output(output):
    """The tensor to compare: logits, last_hidden_state, or the first tensor of the output."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if value is None and isinstance(output, dict):
            value = output.get(key)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, torch.Tensor) or (hasattr(output, "__array__") and not isinstance(output, (list, tuple, dict))):
        return output
    import torch.utils._pytree as pytree

    return next(leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor))


def deit_small(batch: int, seq: int | None = None):
    """DeiT-S-shaped ViT (HF ViTForImageClassification, 12 x 384, 224x224), random weights."""
    from graphopt.zoo import deit_small as build

    return build(batch)


def minilm(batch: int, seq: int | None = None):
    """all-MiniLM-L6-v2 (real weights), ``batch`` sentences padded to ``seq`` tokens."""
    from graphopt.zoo import minilm as build, minilm_tokenizer, sentences

    case = build(max_length=seq or 128)
    case.kwargs = dict(minilm_tokenizer()(sentences(batch), padding="max_length", max_length=seq or 128,
                                          truncation=True, return_tensors="pt"))
    return case


def tiny_vit(batch: int, seq: int | None = None):
    """The built-in example model (a small pure-torch ViT)."""
    from graphopt.zoo import tiny_vit as build

    return build(batch)


MODELS = {"deit_small": deit_small, "minilm": minilm, "tiny_vit": tiny_vit}
