"""Small models several test files convert: a tiny BERT with padded batches and an MLP with an op
that has no integer form."""
import pytest
import torch

VOCAB = 50


def tiny_bert(hidden_size: int, layers: int, seed: int = 0):
    """A randomly initialised BertModel (two heads, no pooler), built after seeding torch."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=hidden_size, num_hidden_layers=layers,
                                  num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=16)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def padded_ids(generator, n: int, length: int):
    """(input_ids, attention_mask) of ``n`` rows, each keeping its first 3 to ``length`` tokens."""
    ids = torch.randint(1, VOCAB, (n, length), generator=generator)
    mask = (torch.arange(length) < torch.randint(3, length + 1, (n, 1), generator=generator)).long()
    return ids, mask


class TanhMLP(torch.nn.Module):
    """linear -> tanh -> linear: tanh has no integer form, so integer_only leaves it in float."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))
