"""Transformer structure analysis against each model's known configuration, on graphs from
torch.export and from ONNX files (torch.onnx.export, dynamo exporter)."""
import pytest
import torch

from graphopt.frontends import from_torch
from graphopt.ir import Graph, TensorType
from graphopt.ir.structure import StructureError, analyze
from graphopt.passes import PassManager

VISION = ["tiny_vit_case", "deit_case", "deit_distilled_case", "clip_case", "digits_case"]
TEXT = ["bert_case", "minilm_case", "gpt2_case"]


def expected(case) -> dict:
    """What the model's own configuration says the analysis must find."""
    cfg = case.config
    if cfg is None:  # the pure-torch tiny ViT
        block = case.model.blocks[0]
        return dict(layers=len(case.model.blocks), heads=block.heads, hidden=block.qkv.in_features, norm="pre",
                    special=[0], causal=False, fused=True)
    name = type(case.model).__name__
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    special = {"DeiTForImageClassificationWithTeacher": [0, 1], "BertModel": [], "GPT2Model": []}.get(name, [0])
    return dict(layers=layers, heads=heads, hidden=hidden, norm="post" if name == "BertModel" else "pre",
                special=special, causal=name == "GPT2Model", fused=name == "GPT2Model")


def check(structure, want):
    assert not structure.problems, structure.problems
    (stack,) = structure.stacks
    assert len(stack) == want["layers"]
    assert structure.special_tokens[0] == want["special"]
    for block in stack:
        att = block.attention
        assert (att.num_heads, att.head_size) == (want["heads"], want["hidden"] // want["heads"])
        assert block.hidden_size == want["hidden"]
        assert block.norm_position == want["norm"]
        assert block.token_axis == 1
        assert att.causal == want["causal"]
        assert att.fused_qkv == want["fused"]
        assert att.out.out_features == want["hidden"]
        assert block.mlp.fc1.in_features == want["hidden"] and block.mlp.fc2.out_features == want["hidden"]
        assert len(block.residual_adds) == 2 and len(block.norms) == 2
    assert [b.index for b in structure.blocks] == list(range(want["layers"]))


def capture(case):
    return from_torch(case.model, tuple(case.args), dict(case.kwargs), dynamic_batch=bool(case.dynamic_batch))


@pytest.mark.parametrize("fixture", VISION + TEXT)
def test_torch_export_graphs(fixture, request):
    case = request.getfixturevalue(fixture)
    graph = capture(case)
    check(analyze(graph), expected(case))
    decomposed, _ = PassManager(["decompose_attention", "dce"]).run(graph)
    structure = analyze(decomposed)
    check(structure, expected(case))
    assert all(b.attention.kind == "softmax" for b in structure.blocks)


# DeiT-S and its distilled variant are covered through torch.export; their 22M-parameter ONNX
# exports take minutes on 2 cores, so the ONNX path is checked on the other models.
@pytest.mark.parametrize("fixture", ["tiny_vit_case", "clip_case", "digits_case"] + TEXT)
def test_onnx_exported_graphs(fixture, request, tmp_path):
    from graphopt.frontends import from_onnx
    case = request.getfixturevalue(fixture)
    program = torch.onnx.export(case.model, tuple(case.args), kwargs=dict(case.kwargs), dynamo=True, verbose=False)
    path = tmp_path / "model.onnx"
    program.save(str(path))
    check(analyze(from_onnx(str(path))), expected(case))


def test_llava_stacks_and_connector(llava_case):
    graph = capture(llava_case)
    structure = analyze(graph)
    cfg = llava_case.config
    vision, language = structure.stacks
    assert len(vision) == cfg.vision_config.num_hidden_layers
    assert len(language) == cfg.text_config.num_hidden_layers
    assert language[0].attention.num_heads == cfg.text_config.num_attention_heads
    assert language[0].attention.num_kv_heads == cfg.text_config.num_key_value_heads
    assert language[0].attention.causal and not vision[0].attention.causal
    assert language[0].mlp.gate is not None  # Llama's SwiGLU
    assert [n.kind for n in language[0].norms] == ["rms_norm", "rms_norm"]
    assert [p.name for p in structure.connector] == ["model.multi_modal_projector.linear_1.weight",
                                                     "model.multi_modal_projector.linear_2.weight"]
    assert structure.connector_input is vision[-1].output
    assert structure.special_tokens[0] == [0]


def test_no_blocks_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    with pytest.raises(StructureError, match="no attention found: the graph has no sdpa node and no softmax"):
        analyze(from_torch(model, (torch.randn(2, 8),)))


def test_incomplete_block_is_reported_not_guessed():
    g = Graph()
    q = g.add_input("q", TensorType(torch.float32, ("batch", 4, 16, 8)))
    g.set_outputs([g.op.sdpa(q, q, q)])  # attention without projections
    with pytest.raises(StructureError, match=r"attention at %0 \(sdpa\).*query: expected one projection feeding %q, found 0"):
        analyze(g)


def test_llava_exported_to_onnx(llava_case, tmp_path):
    """torch 2.13's exporter has no translation for ``aten._is_all_true`` (LLaVA's image-token
    check); the test supplies one, as a user would, and the analysis finds both stacks."""
    from onnxscript import BOOL, INT64
    from onnxscript import opset18 as op

    from graphopt.frontends import from_onnx

    def is_all_true(x: BOOL) -> BOOL:
        return op.Cast(op.ReduceMin(op.Cast(x, to=INT64.dtype), keepdims=0), to=BOOL.dtype)

    program = torch.onnx.export(llava_case.model, (), kwargs=dict(llava_case.kwargs), dynamo=True, verbose=False,
                                custom_translation_table={torch.ops.aten._is_all_true.default: is_all_true})
    path = tmp_path / "llava.onnx"
    program.save(str(path))
    structure = analyze(from_onnx(str(path)))
    cfg = llava_case.config
    assert not structure.problems, structure.problems
    vision, language = structure.stacks
    assert (len(vision), len(language)) == (cfg.vision_config.num_hidden_layers, cfg.text_config.num_hidden_layers)
    assert language[0].attention.causal and language[0].mlp.gate is not None
    assert [n.kind for n in language[0].norms] == ["rms_norm", "rms_norm"]
    assert len(structure.connector) == 2 and structure.connector_input is vision[-1].output
