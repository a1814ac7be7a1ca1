"""Both sides of the edges in the CoI-M layers (models/coim.py) and the backbones' declared sizes, and
the layout flags (``is_channels_last``, ``weight_is_channels_last``) tested through the layout of the
outputs they decide. References: ``F.conv2d`` with the same weights, run sample by sample."""
import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.coim import (ModulatedConv2d, channel_means, is_channels_last, sibling_convs,
                         weight_is_channels_last)

CL = torch.channels_last


def _conv(*args, **kwargs) -> ModulatedConv2d:
    torch.manual_seed(0)
    return ModulatedConv2d(*args, dim_in=4, **kwargs).double()


def _x(b=2, c=4, h=6, w=7):
    return torch.rand(b, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _z(b=2):
    return torch.randn(b, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


# ------------------------------------------------------------------ which kernels are modulated
@pytest.mark.parametrize("kernel, modulated", [((1, 1), False), ((1, 2), True), ((2, 1), True), ((3, 3), True)])
def test_only_kernels_of_more_than_one_tap_are_modulated(kernel, modulated):
    conv = _conv(4, 4, kernel, padding=0)
    x, z = _x(), _z()
    plain = F.conv2d(x, conv.weight, conv.bias)
    assert conv.modulated == modulated
    assert torch.allclose(conv(x, z), plain) != modulated
    torch.testing.assert_close(conv(x), plain)


def test_no_generator_means_no_modulation():
    torch.manual_seed(0)
    conv = ModulatedConv2d(4, 4, 3, dim_in=0).double()
    assert conv.generator is None and not conv.modulated
    x = _x()
    torch.testing.assert_close(conv(x, _z()), F.conv2d(x, conv.weight, conv.bias, padding=1))


@pytest.mark.parametrize("groups, hidden", [(1, 32), (2, 2)])
def test_grouped_convs_have_a_narrower_generator(groups, hidden):
    conv = _conv(32, 32, 3, groups=groups)
    assert conv.generator[0].out_features == hidden
    assert conv.generator[-1].out_features == 32 // groups + 32 + 9


# ------------------------------------------------------------------ the CPU fast paths against F.conv2d
@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=1, padding=0, groups=4),              # depthwise 1x1: the per-channel scale path
    dict(kernel_size=1, padding=1, groups=4),              # padded: not a plain scale
    dict(kernel_size=1, padding=0, groups=4, stride=2),    # strided: not a plain scale
    dict(kernel_size=1, padding=0, groups=2),              # two channels per group
    dict(kernel_size=1, padding=0, groups=4, bias=False),
])
def test_one_by_one_convs_equal_f_conv2d(kwargs):
    conv = _conv(4, 4, **kwargs)
    x = _x()
    expected = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, groups=conv.groups)
    torch.testing.assert_close(conv(x), expected)


@pytest.mark.parametrize("in_channels, groups", [(3, 3), (6, 3), (9, 3), (12, 3)])  # 1, 2, 3, 4 inputs per group
def test_grouped_conv_with_one_output_per_group(in_channels, groups):
    conv = _conv(in_channels, groups, 3, groups=groups)
    x, z = _x(c=in_channels), _z()
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1, groups=groups))
    weights = conv.sample_weight(x, z)
    for n in range(2):  # modulated: sample n with its own kernel
        expected = F.conv2d(x[n:n + 1], weights[n], conv.bias, padding=1, groups=groups)
        torch.testing.assert_close(conv(x, z)[n:n + 1], expected)


@pytest.mark.parametrize("batch", [1, 2])
def test_per_sample_conv_at_batch_one_and_two(batch):
    conv = _conv(4, 5, 3)
    x, z = _x(b=batch), _z(b=batch)
    out = conv(x, z)
    assert out.shape == (batch, 5, 6, 7)
    for n in range(batch):
        torch.testing.assert_close(out[n:n + 1], F.conv2d(x[n:n + 1], conv.sample_weight(x, z)[n], conv.bias,
                                                          padding=1))


def test_sibling_convs_equal_each_conv_and_refuse_other_geometry():
    convs = [_conv(4, 3, 3), _conv(4, 2, 3)]
    x, z = _x(), _z()
    for code in (None, z):
        torch.testing.assert_close(sibling_convs(convs, x, code), torch.cat([c(x, code) for c in convs], 1))
    with pytest.raises(ValueError, match="differ"):
        sibling_convs([convs[0], _conv(4, 3, 3, padding=0)], x)


# ------------------------------------------------------------------ layouts
def test_is_channels_last_edges():
    x = torch.rand(2, 3, 4, 5)
    assert not is_channels_last(x)
    assert is_channels_last(x.contiguous(memory_format=CL))
    assert not is_channels_last(torch.rand(2, 3, 1, 1).contiguous(memory_format=CL))  # both layouts at once
    assert not is_channels_last(torch.rand(3, 4, 5))


@pytest.mark.parametrize("groups", [1, 4, 8])  # full, grouped, depthwise (the same memory in both layouts)
def test_weight_layout_decides_the_output_layout(groups):
    conv = _conv(8, 8, 3, groups=groups).float()  # oneDNN keeps layouts in float32 (float64 has no such path)
    x, z = _x(b=1, c=8).float(), _z(b=1).float()  # batch 1: inference, where the layout is kept
    expected = conv(x, z)
    assert not weight_is_channels_last(conv)
    conv = conv.to(memory_format=CL)
    assert weight_is_channels_last(conv)
    out = conv(x.contiguous(memory_format=CL), z)
    assert is_channels_last(out)
    torch.testing.assert_close(out, expected)


def test_channel_means_in_bf16_channels_last_equal_the_mean():
    x = torch.rand(2, 3, 5, 7)
    reference = x.double().mean(dim=(-2, -1))
    for t in (x.bfloat16().contiguous(memory_format=CL), x.bfloat16(), x):
        got = channel_means(t)
        assert got.dtype == t.dtype
        torch.testing.assert_close(got.double(), reference, atol=2e-2, rtol=0)
    x = torch.rand(1, 2, 4, 4) + 10  # the sum / (H * W) path: a divisor one off is 1/16 off (0.6 here)
    t = x.bfloat16().contiguous(memory_format=CL)
    assert is_channels_last(t)
    assert (channel_means(t).double() - x.double().mean(dim=(-2, -1))).abs().max() < 0.1


# ------------------------------------------------------------------ backbones' declared sizes
@pytest.mark.parametrize("h, w, ok", [(16, 16, True), (16, 24, True), (20, 16, False), (16, 12, False)])
def test_drsformer_needs_multiples_of_eight(h, w, ok):
    model = build_model("DRSformer", dim=8, num_blocks=[1, 1, 1, 1], heads=[1, 1, 2, 2]).eval()
    assert model.size_multiple == 8
    x = torch.rand(1, 3, h, w)
    if ok:
        with torch.no_grad():
            assert model(x).shape == x.shape
    else:
        with pytest.raises(ValueError, match="divisible by 8"):
            model(x)
