"""ONNX lowerings of ATen ops the IR keeps opaque, each on small modules captured with the torch
frontend and run on ONNX Runtime against the original module (the variants the Hugging Face
architectures in test_hf_architectures.py do not reach)."""
import pytest
import torch
import torch.nn.functional as F

from graphopt.backends.registry import lower
from graphopt.frontends import from_torch


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


X = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
W3 = torch.randn(4, 4, 2, 3, generator=torch.Generator().manual_seed(1))
STATS = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
SEQ = torch.randint(0, 5, (2, 7), generator=torch.Generator().manual_seed(2))

CASES = {
    "argsort_descending": (lambda x: torch.argsort(x.flatten(1), dim=-1, descending=True), X),
    "argsort_stable": (lambda x: torch.argsort(x, dim=1, stable=True), torch.randn(2, 9)),
    "min_other": (lambda x: torch.min(x, 4 - x), SEQ),
    "max_other": (lambda x: torch.max(x, x.transpose(2, 3) * 0.5), X),
    "argmax_keepdim": (lambda x: torch.argmax(x, dim=1, keepdim=True), X),
    "cumsum_float": (lambda x: torch.cumsum(x, dim=2), X),
    "cumsum_bool": (lambda x: torch.cumsum(x > 2, dim=-1), SEQ),
    "diff_twice_with_append": (lambda x: torch.diff(x, n=2, dim=1, append=x[:, :2]), SEQ),
    "pad_reflect": (lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect"), X),
    "pad_replicate": (lambda x: F.pad(x, (1, 0, 0, 2), mode="replicate"), X),
    "pad_constant_value": (lambda x: F.pad(x, (1, 2), value=-3.0), X),
    "conv2d_same_even_kernel": (lambda x: F.conv2d(x, W3, padding="same"), X),
    "conv2d_valid_dilated": (lambda x: F.conv2d(x, W3, padding="valid", dilation=2), X),
    "upsample_nearest_scale": (lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), X),
    "upsample_bilinear_align": (lambda x: F.interpolate(x, size=(9, 5), mode="bilinear", align_corners=True), X),
    "upsample_bilinear_scale": (lambda x: F.interpolate(x, scale_factor=1.5, mode="bilinear"), X),
    "upsample_bicubic": (lambda x: F.interpolate(x, size=(8, 8), mode="bicubic"), X),
    "adaptive_avg_pool_divides": (lambda x: F.adaptive_avg_pool2d(x, (3, 2)), X),
    "max_pool_ceil": (lambda x: F.max_pool2d(x, 3, stride=2, ceil_mode=True), X),
    "batch_norm_no_affine": (lambda x: F.batch_norm(x, STATS[0], STATS[1]), X),
    "group_norm": (lambda x: F.group_norm(x, 2, STATS[1], STATS[0]), X),
    "meshgrid_xy": (lambda x: sum(torch.meshgrid(x[0, 0, 0], x[0, 0, :, 1], indexing="xy")) + x, X),
    "repeat_adds_axes": (lambda x: x[0].repeat(2, 1, 1, 2), X),
    "slice_scatter": (lambda x: torch.slice_scatter(x, x[:, :, 1:3] * 2, dim=2, start=2, end=4), X),
}


@pytest.mark.parametrize("name", CASES)
def test_aten_lowering_matches_torch(name):
    fn, x = CASES[name]
    module = Fn(fn).eval()
    expected = module(x)
    graph = from_torch(module, (x,))
    got = lower(graph, "onnxruntime", threads=1)(x)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if expected.dtype.is_floating_point:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, expected)
