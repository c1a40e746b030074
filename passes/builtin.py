"""Imports every built-in pass module so each registers itself."""
from graphopt.passes import constant_folding, cse, dce, decompose_attention, fuse_gelu  # noqa: F401
from graphopt.passes import fuse_low_rank, lora_merge, low_rank  # noqa: F401  (low-rank factorisation, LoRA merge, fused low-rank MLP)
from graphopt.passes import token_drop, token_merge  # noqa: F401  (token reduction: ToMe, HiRED/FastV)
from graphopt.passes import integer_only  # noqa: F401  (integer-only transformers, I-ViT)
from graphopt.passes import acm  # noqa: F401  (adaptive computation modules)
from graphopt.passes import sparsify  # noqa: F401  (pruning: magnitude / Wanda / SparseGPT, structured, sparse_linear)
from graphopt.passes import zero_padded_positions  # noqa: F401  (padded positions' outputs 0, so backends skip them)
from graphopt.passes import narrow_rows  # noqa: F401  (only the rows the outputs read: a classifier's last block on its CLS token)
