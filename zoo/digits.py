"""The digits ViT: a small HF ViT trained on sklearn's digits (about 97% test accuracy), with its data
split, for accuracy measurements; trained once and cached on disk."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.ir.files import atomic_write
from graphopt.zoo.case import ModelCase


_DIGITS_VERSION = "1"
# initializer_range 0.1 (HF default 0.02) is what makes training fast: with the default, accuracy sits
# near chance for the first epochs and 97% takes ~3x the optimizer steps.
_DIGITS_CONFIG = dict(image_size=32, patch_size=4, num_channels=1, hidden_size=96, num_hidden_layers=4,
                      num_attention_heads=4, intermediate_size=384, num_labels=10, initializer_range=0.1,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# threads is fixed (and part of the cache key) because the thread count changes float reduction order,
# hence the trained weights.
_DIGITS_TRAIN = dict(seed=0, test_size=0.25, epochs=10, batch_size=32, lr=1e-3, weight_decay=0.05,
                     warmup=0.05, label_smoothing=0.1, threads=2)


@dataclasses.dataclass(kw_only=True)
class DigitsCase(ModelCase):
    """A ViT trained on sklearn digits, with its data split, for accuracy measurements."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    test_accuracy: float = 0.0
    cache_path: Path | None = None
    from_cache: bool = False
    train_seconds: float | None = None

    def accuracy(self, fn: Callable[[torch.Tensor], Any]) -> float:
        """Top-1 test accuracy of ``fn`` (pixel batch -> logits, or an HF output carrying ``.logits``)."""
        with torch.no_grad():
            out = fn(self.test_images)
        logits = getattr(out, "logits", out)
        return (logits.argmax(-1) == self.test_labels).float().mean().item()


def _digits_data(seed: int, test_size: float):
    """8x8 digits (0..16) upsampled bilinearly to 32x32 and scaled to [-1, 1]; stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False) * 2 - 1
    y = torch.tensor(digits.target)
    train, test = train_test_split(torch.arange(len(y)), test_size=test_size, stratify=digits.target,
                                   random_state=seed)
    return x[train], y[train], x[test], y[test]


def _train_digits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict) -> None:
    """AdamW, linear warmup then cosine decay, on a fixed number of threads."""
    steps = hp["epochs"] * math.ceil(len(y) / hp["batch_size"])
    warmup = max(1, int(steps * hp["warmup"]))
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))
    gen = torch.Generator().manual_seed(hp["seed"])
    threads = torch.get_num_threads()
    torch.set_num_threads(hp["threads"])
    try:
        model.train()
        for _ in range(hp["epochs"]):
            for idx in torch.randperm(len(y), generator=gen).split(hp["batch_size"]):
                logits = model(pixel_values=x[idx]).logits
                loss = F.cross_entropy(logits, y[idx], label_smoothing=hp["label_smoothing"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()


def cache_dir() -> Path:
    """Where trained weights are cached: $GRAPHOPT_CACHE, else ~/.cache/graphopt."""
    return Path(os.environ.get("GRAPHOPT_CACHE", Path.home() / ".cache" / "graphopt"))


def digits_vit(batch: int = 2) -> DigitsCase:
    """Small HF ViT trained on sklearn digits (about 97% test accuracy); cached on disk, so only the
    first build trains (about half a minute on 2 cores)."""
    from transformers import ViTConfig, ViTForImageClassification

    xtr, ytr, xte, yte = _digits_data(_DIGITS_TRAIN["seed"], _DIGITS_TRAIN["test_size"])
    torch.manual_seed(_DIGITS_TRAIN["seed"])
    config = ViTConfig(**_DIGITS_CONFIG)
    model = ViTForImageClassification(config)
    key = json.dumps({"version": _DIGITS_VERSION, "config": _DIGITS_CONFIG, "train": _DIGITS_TRAIN}, sort_keys=True)
    path = cache_dir() / f"digits_vit-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    from_cache, seconds = path.exists(), None
    if from_cache:
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        start = time.perf_counter()
        _train_digits(model, xtr, ytr, _DIGITS_TRAIN)
        seconds = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        atomic_write(str(path), buffer.getvalue())  # concurrent readers never see a partial file
    case = DigitsCase(name="digits_vit", model=model.eval(), args=(), kwargs={"pixel_values": xte[:batch]},
                      dynamic_batch={"pixel_values": 0}, config=config, train_images=xtr, train_labels=ytr,
                      test_images=xte, test_labels=yte, cache_path=path, from_cache=from_cache,
                      train_seconds=seconds)
    case.test_accuracy = case.accuracy(model)
    return case
