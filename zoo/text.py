"""Hugging Face text models from configs with random weights: an encoder (BERT) and a causal LM (GPT-2)."""
from __future__ import annotations

import torch

from graphopt.zoo.case import ModelCase, hf_case


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
    return hf_case("bert", model, input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def gpt2(seq_len: int = 16, attn_implementation: str = "sdpa") -> ModelCase:
    """Small random ``GPT2Model`` (4x128, 4 heads): causal mask, fused qkv (Conv1D), tanh GELU."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=1000, n_positions=128, use_cache=False,
                        bos_token_id=0, eos_token_id=0, attn_implementation=attn_implementation)
    input_ids = torch.randint(0, config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    return hf_case("gpt2", GPT2Model(config), input_ids=input_ids)
