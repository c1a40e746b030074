"""Hugging Face architectures graphopt has no special code for, built offline from tiny configs with
random weights: each is captured with the torch frontend and run on the torch backend and on ONNX
Runtime, and both must match the original model."""
import pytest
import torch
import torch.utils._pytree as pytree

transformers = pytest.importorskip("transformers")

import graphopt  # noqa: E402
from graphopt.backends.registry import lower  # noqa: E402
from graphopt.frontends import from_torch  # noqa: E402

HIDDEN = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TEXT = dict(HIDDEN, vocab_size=99, max_position_embeddings=64)
DECODER = dict(TEXT, num_key_value_heads=1)
VISION = dict(HIDDEN, image_size=32, patch_size=8, num_channels=3)


def _ids(batch=2, length=12, vocab=99):
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, length), generator=g)


def _mask(batch=2, length=12):
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1:, length - 3:] = 0  # the second sequence is padded: the mask matters
    return mask


def _images(batch=2, size=32, channels=3):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


def _audio(batch=2, length=1600):
    return torch.randn(batch, length, generator=torch.Generator().manual_seed(2))


def _text(model_cls, config_cls, **extra):
    def build():
        return model_cls(config_cls(**{**TEXT, **extra})), {"input_ids": _ids(), "attention_mask": _mask()}
    return build


def _vision(model_cls, config_cls, **extra):
    def build():
        return model_cls(config_cls(**{**VISION, **extra})), {"pixel_values": _images()}
    return build


def _decoder(model_cls, config_cls, masked=True, **extra):
    """Decoders are tried with a padding mask and without one (the mask code differs)."""
    def build():
        inputs = {"input_ids": _ids(), "use_cache": False}
        if masked:
            inputs["attention_mask"] = _mask()
        return model_cls(config_cls(**{**DECODER, **extra})), inputs
    return build


def _t5():
    config = transformers.T5Config(vocab_size=99, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
    return transformers.T5EncoderModel(config), {"input_ids": _ids(), "attention_mask": _mask()}


def _bart():
    config = transformers.BartConfig(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64)
    return transformers.BartModel(config).get_encoder(), {"input_ids": _ids(), "attention_mask": _mask()}


def _whisper():
    config = transformers.WhisperConfig(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
                                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=20,
                                        pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=2)
    features = torch.randn(2, 16, 40, generator=torch.Generator().manual_seed(3))
    return transformers.WhisperModel(config).get_encoder(), {"input_features": features}


def _wav2vec2():
    config = transformers.Wav2Vec2Config(**HIDDEN, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
                                         num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
                                         vocab_size=32)
    return transformers.Wav2Vec2Model(config), {"input_values": _audio()}


def _gpt2():
    config = transformers.GPT2Config(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2Model(config), {"input_ids": _ids(), "attention_mask": _mask(), "use_cache": False}


def _opt():
    config = transformers.OPTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32)
    return transformers.OPTModel(config), {"input_ids": _ids(), "attention_mask": _mask(), "use_cache": False}


def _distilbert():
    config = transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=64)
    return transformers.DistilBertModel(config), {"input_ids": _ids(), "attention_mask": _mask()}


def _albert():
    config = transformers.AlbertConfig(**TEXT, embedding_size=16)
    return transformers.AlbertModel(config), {"input_ids": _ids(), "attention_mask": _mask()}


def _swin():
    config = transformers.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                     window_size=4)
    return transformers.SwinModel(config), {"pixel_values": _images()}


def _segformer():
    config = transformers.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                          hidden_sizes=[16, 32], num_attention_heads=[1, 2], patch_sizes=[7, 3],
                                          strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=3)
    return transformers.SegformerForSemanticSegmentation(config), {"pixel_values": _images()}


def _convnext():
    config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], image_size=32)
    return transformers.ConvNextModel(config), {"pixel_values": _images()}


def _resnet():
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    return transformers.ResNetModel(config), {"pixel_values": _images()}


def _siglip_vision():
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)), {"pixel_values": _images()}


def _siglip_text():
    config = transformers.SiglipTextConfig(**TEXT)
    return transformers.SiglipTextModel(config), {"input_ids": _ids()}


def _clip_text():
    config = transformers.CLIPTextConfig(**TEXT)
    return transformers.CLIPTextModel(config), {"input_ids": _ids(), "attention_mask": _mask()}


ARCHITECTURES = {
    "vit": _vision(transformers.ViTModel, transformers.ViTConfig),
    "deit": _vision(transformers.DeiTModel, transformers.DeiTConfig),
    "dinov2": _vision(transformers.Dinov2Model, transformers.Dinov2Config, mlp_ratio=2),
    "beit": _vision(transformers.BeitModel, transformers.BeitConfig, use_relative_position_bias=True),
    "data2vec_vision": _vision(transformers.Data2VecVisionModel, transformers.Data2VecVisionConfig),
    "swin": _swin,
    "segformer": _segformer,
    "convnext": _convnext,
    "resnet": _resnet,
    "siglip_vision": _siglip_vision,
    "siglip_text": _siglip_text,
    "clip_text": _clip_text,
    "whisper_encoder": _whisper,
    "wav2vec2": _wav2vec2,
    "bert": _text(transformers.BertModel, transformers.BertConfig),
    "roberta": _text(transformers.RobertaModel, transformers.RobertaConfig, pad_token_id=1),
    "distilbert": _distilbert,
    "albert": _albert,
    "t5_encoder": _t5,
    "bart_encoder": _bart,
    "gpt2": _gpt2,
    "opt": _opt,
    "llama": _decoder(transformers.LlamaModel, transformers.LlamaConfig),
    "llama_unmasked": _decoder(transformers.LlamaModel, transformers.LlamaConfig, masked=False),
    "mistral": _decoder(transformers.MistralModel, transformers.MistralConfig, masked=False),
    "qwen2": _decoder(transformers.Qwen2Model, transformers.Qwen2Config),
}

XFAIL: dict[str, str] = {}


def _leaves(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _assert_close(got, expected, what):
    got, expected = _leaves(got), _leaves(expected)
    assert len(got) == len(expected), f"{what}: {len(got)} outputs, the model gives {len(expected)}"
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype, (what, g.shape, e.shape, g.dtype, e.dtype)
        scale = max(e.abs().max().item(), 1.0) if e.numel() else 1.0
        err = (g.double() - e.double()).abs().max().item() if e.numel() else 0.0
        assert err <= 1e-4 * scale, f"{what}: max abs error {err:.3g} (output scale {scale:.3g})"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=XFAIL[n]))
                                  if n in XFAIL else n for n in ARCHITECTURES])
def test_architecture_end_to_end(name):
    torch.manual_seed(0)
    model, inputs = ARCHITECTURES[name]()
    model.eval()
    with torch.no_grad():
        expected = model(**inputs)
    graph = from_torch(model, (), inputs)
    with torch.no_grad():  # ONNX Runtime runs the graph as captured, so every ATen op meets its lowering
        got = lower(graph, "onnxruntime", threads=1)(**inputs)
    _assert_close(got, expected, f"{name} on onnxruntime")
    optimized = graphopt.optimize(graph, ["constant_folding", "cse", "dce"])
    for call in range(2):  # a second call sees the same constants (nothing may mutate them)
        _assert_close(optimized(**inputs), expected, f"{name} on torch after the cleanups, call {call + 1}")
