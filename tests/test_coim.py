import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models.coim import (ModulatedConv2d, ModulatedConvTranspose2d, channel_means, modulation_parameters,
                         sibling_convs)


def _randomise_generator(layer):
    with torch.no_grad():
        for p in layer.generator.parameters():
            p.normal_()


@pytest.mark.parametrize("groups", [1, 4])
def test_plain_when_z_is_none(groups):
    torch.manual_seed(0)
    layer = ModulatedConv2d(16, 32, 3, 1, 1, groups=groups, dim_in=8)
    x = torch.randn(3, 16, 10, 10)
    expected = F.conv2d(x, layer.weight, layer.bias, padding=1, groups=groups)
    assert torch.equal(layer(x), expected)
    _randomise_generator(layer)
    assert torch.equal(layer(x, None), expected)


@pytest.mark.parametrize("groups,stride", [(1, 1), (4, 2), (16, 1)])
def test_grouped_form_equals_per_sample_loop(groups, stride):
    torch.manual_seed(0)
    layer = ModulatedConv2d(16, 32, 3, stride, 1, groups=groups, dim_in=8)
    x, z = torch.randn(3, 16, 9, 9), F.normalize(torch.randn(3, 8), dim=1)
    out = layer(x, z)
    att = layer.kernel_attention(x, z)
    for n in range(3):
        ref = F.conv2d(x[n:n + 1], layer.weight * att[n], layer.bias, stride=stride, padding=1, groups=groups)
        torch.testing.assert_close(out[n:n + 1], ref, atol=1e-5, rtol=1e-5)


def test_attention_formula_and_scale():
    torch.manual_seed(0)
    layer = ModulatedConv2d(4, 6, 3, dim_in=5)
    x, z = torch.randn(2, 4, 7, 7), torch.randn(2, 5)
    att = layer.kernel_attention(x, z)
    assert att.shape == (2, 6, 4, 3, 3)
    # softmax over the 9 taps times k²: every (o, i) kernel's multipliers sum to 9
    torch.testing.assert_close(att.sum(dim=(-2, -1)), torch.full((2, 6, 4), 9.0))
    code = layer.generator(torch.cat([z, x.mean(dim=(-2, -1))], 1))
    a, b, c = code[:, :6], code[:, 6:10], code[:, 10:]
    # published memory reading: the (C_in, C_out) map laid out as (C_out, C_in)
    gate = torch.sigmoid(b[:, :, None] + a[:, None, :])
    expected = (torch.softmax(gate[..., None] * c[:, None, None, :], -1) * 9).reshape(2, 6, 4, 3, 3)
    torch.testing.assert_close(att, expected)


def test_attention_under_bf16_autocast_follows_the_formula():
    """Under autocast the taps lead during the softmax (a faster axis order on a CPU); the multipliers
    are still read in the published order."""
    torch.manual_seed(0)
    layer = ModulatedConv2d(4, 6, 3, dim_in=5)
    with torch.no_grad():
        layer.generator[4].weight.mul_(30)  # sharp softmaxes: a misplaced multiplier is far off
    x, z = torch.randn(2, 4, 7, 7), torch.randn(2, 5)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        att = layer.kernel_attention(x, z)
        a, b, c = (t.float() for t in layer.modulation_codes(x, z))
    assert att.dtype == torch.bfloat16 and att.shape == (2, 6, 4, 3, 3)
    gate = torch.sigmoid(b[:, :, None] + a[:, None, :])
    expected = (torch.softmax(gate[..., None] * c[:, None, None, :], -1) * 9).reshape(2, 6, 4, 3, 3)
    assert expected.amax() > 3 * expected.amin() + 1  # far from uniform
    torch.testing.assert_close(att.float(), expected, atol=0.03, rtol=0.02)


def test_differs_per_sample_when_z_differs():
    torch.manual_seed(0)
    layer = ModulatedConv2d(8, 8, 3, dim_in=4)
    x = torch.randn(1, 8, 8, 8).expand(2, -1, -1, -1)
    z = F.normalize(torch.randn(2, 4), dim=1)
    out = layer(x, z)
    assert not torch.allclose(out[0], out[1])
    same = layer(x, z[:1].expand(2, -1))
    torch.testing.assert_close(same[0], same[1])
    assert not torch.allclose(layer(x, z), layer(x))


def test_one_by_one_never_modulated_and_dim0_is_plain():
    torch.manual_seed(0)
    layer = ModulatedConv2d(8, 4, 1, 1, 0, dim_in=4)
    x, z = torch.randn(2, 8, 5, 5), torch.randn(2, 4)
    assert torch.equal(layer(x, z), layer(x))
    plain = ModulatedConv2d(8, 4, 3, dim_in=0)
    assert plain.generator is None and modulation_parameters(plain) == []
    assert len(plain.state_dict()) == 2


def test_transposed_plain_and_loop():
    torch.manual_seed(0)
    layer = ModulatedConvTranspose2d(6, 4, 2, stride=2, padding=0, dim_in=5)
    x, z = torch.randn(3, 6, 5, 5), torch.randn(3, 5)
    assert torch.equal(layer(x), F.conv_transpose2d(x, layer.weight, layer.bias, stride=2))
    out = layer(x, z)
    assert out.shape == (3, 4, 10, 10)
    att = layer.kernel_attention(x, z)
    assert att.shape == (3, 6, 4, 2, 2)
    for n in range(3):
        ref = F.conv_transpose2d(x[n:n + 1], layer.weight * att[n], layer.bias, stride=2)
        torch.testing.assert_close(out[n:n + 1], ref, atol=1e-5, rtol=1e-5)


def test_gradients_reach_generator_only_with_z():
    layer = ModulatedConv2d(4, 4, 3, dim_in=3)
    x = torch.randn(2, 4, 6, 6)
    layer(x).sum().backward()
    assert all(p.grad is None for p in layer.generator.parameters())
    layer(x, torch.randn(2, 3)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.generator.parameters())


def test_transposed_attention_formula():
    # C_in != C_out, so reading the gate map the other way gives another tensor
    torch.manual_seed(0)
    layer = ModulatedConvTranspose2d(3, 5, 2, stride=2, padding=0, dim_in=4)
    x, z = torch.randn(2, 3, 6, 6), torch.randn(2, 4)
    att = layer.kernel_attention(x, z)
    assert att.shape == (2, 3, 5, 2, 2)
    code = layer.generator(torch.cat([z, x.mean(dim=(-2, -1))], 1))
    b, a, c = code[:, :3], code[:, 3:8], code[:, 8:]  # [C_in | C_out | k²], the published split
    # published memory reading: the (C_out, C_in) gate map laid out as the weight's (C_in, C_out)
    gate = torch.sigmoid(a[:, :, None] + b[:, None, :])
    expected = (torch.softmax(gate[..., None] * c[:, None, None, :], -1) * 4).reshape(2, 3, 5, 2, 2)
    torch.testing.assert_close(att, expected)
    torch.testing.assert_close(att.sum(dim=(-2, -1)), torch.full((2, 3, 5), 4.0))


@pytest.mark.parametrize("modulated", [False, True])
def test_sibling_convs_equal_each_conv_per_sample(modulated):
    """Stacked convolutions of one input give, per sample, what each conv gives with its own kernel."""
    torch.manual_seed(0)
    convs = [ModulatedConv2d(12, c, 3, 1, 1, dim_in=8) for c in (5, 7, 5)]
    for conv in convs:
        _randomise_generator(conv)
    x, z = torch.randn(3, 12, 9, 11), (F.normalize(torch.randn(3, 8), dim=1) if modulated else None)
    out = sibling_convs(convs, x, z)
    assert out.shape == (3, 17, 9, 11)
    for n in range(3):
        refs = []
        for conv in convs:
            weight = conv.weight * conv.kernel_attention(x, z)[n] if modulated else conv.weight
            refs.append(F.conv2d(x[n:n + 1], weight, conv.bias, padding=1))
        torch.testing.assert_close(out[n:n + 1], torch.cat(refs, 1), atol=1e-5, rtol=1e-5)


def test_sibling_convs_refuse_convs_that_differ_in_more_than_outputs():
    a, b = ModulatedConv2d(12, 5, 3, 1, 1, dim_in=8), ModulatedConv2d(12, 5, 3, 2, 1, dim_in=8)
    with pytest.raises(ValueError, match="differ"):
        sibling_convs([a, b], torch.randn(1, 12, 8, 8))


def _channels_last_strides(shape):
    """The strides of a dense channels-last (N, C, H, W) tensor, written out by hand."""
    n, c, h, w = shape
    return (c * h * w, 1, w * c, c)


@pytest.mark.parametrize("kind", ["conv", "transposed", "siblings"])
@pytest.mark.parametrize("input_layout", ["channels_last", "default"])
def test_a_channels_last_model_keeps_its_layout_in_coic_mode(kind, input_layout):
    # A model in channels-last must hand on dense channels-last tensors, z or not, at batch 1
    # (a photo), whatever the layout of its input: a batch stride of C made PyTorch read them as
    # default-layout, and stacked per-sample kernels (sibling_convs) were default-layout, so every
    # concatenation and convolution after them copied (DRSformer's CoIC forward in bf16 took twice
    # its plain one's time). The values stay those of the per-sample convolution.
    torch.manual_seed(0)
    if kind == "transposed":
        layers = [ModulatedConvTranspose2d(8, 6, 2, stride=2, padding=0, dim_in=5)]
    else:
        layers = [ModulatedConv2d(8, c, 3, 1, 1, dim_in=5) for c in ((6,) if kind == "conv" else (4, 2))]
    for layer in layers:
        _randomise_generator(layer)
        layer.to(memory_format=torch.channels_last)
    x, z = torch.randn(1, 8, 7, 9), torch.randn(1, 5)
    if input_layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out = sibling_convs(layers, x, z) if kind == "siblings" else layers[0](x, z)
    assert out.stride() == _channels_last_strides(out.shape)
    assert torch.cat([out, out], 1).stride() == _channels_last_strides((1, 12, *out.shape[-2:]))
    op = F.conv_transpose2d if kind == "transposed" else F.conv2d
    for layer, ref_slice in zip(layers, out.split([layer.weight.shape[kind == "transposed"] for layer in layers], 1)):
        weight = layer.weight.detach().contiguous() * layer.kernel_attention(x, z)[0]
        ref = op(x.contiguous(), weight, layer.bias, stride=layer.stride, padding=layer.padding)
        torch.testing.assert_close(ref_slice, ref, atol=1e-5, rtol=1e-5)


def test_channel_means_by_dtype_and_layout():
    torch.manual_seed(0)
    x = torch.rand(2, 5, 40, 30)
    # float32, and bf16 in the default layout (training): exactly what ``mean`` gives, so a
    # training run's arithmetic does not depend on this shortcut
    assert torch.equal(channel_means(x), x.mean(dim=(-2, -1)))
    assert torch.equal(channel_means(x.bfloat16()), x.bfloat16().mean(dim=(-2, -1)))
    # bf16 in channels-last: the float64 mean of the same bf16 values, within two bf16 roundings
    xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
    got = channel_means(xb)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 5)
    exact = xb.double().sum(dim=(-2, -1)) / (40 * 30)
    torch.testing.assert_close(got.double(), exact, rtol=2 * 2 ** -8, atol=0)
    # float16 keeps ``mean``: a float16 sum of 300 x 300 ones (90,000) would overflow to inf
    ones = torch.ones(1, 3, 300, 300, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert torch.equal(channel_means(ones), torch.ones(1, 3, dtype=torch.float16))


class _ConvShapes(TorchDispatchMode):
    """Records (weight shape, groups) of every convolution run inside it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] == "convolution":
            self.calls.append((tuple(args[1].shape), args[8]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("per_group", [2, 3])
@pytest.mark.parametrize("layout", ["default", "channels_last"])
@pytest.mark.parametrize("modulated", [False, True])
def test_several_inputs_one_output_per_group_equals_a_loop_over_groups(per_group, layout, modulated):
    # DRSformer's second feed-forward stage (two inputs, one output per group) runs on a CPU as a
    # depthwise convolution whose consecutive outputs are summed (oneDNN's grouped kernel for that
    # shape is 3-4 times slower). Values and gradients must be those of each group convolved on its
    # own; the grouped kernel must not run.
    torch.manual_seed(0)
    groups = 4
    layer = ModulatedConv2d(groups * per_group, groups, 3, 1, 2, dilation=2, groups=groups, dim_in=5)
    _randomise_generator(layer)
    x = torch.randn(2, groups * per_group, 7, 9, requires_grad=True)
    z = torch.randn(2, 5) if modulated else None
    if layout == "channels_last":
        layer.to(memory_format=torch.channels_last)
    xin = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    spy = _ConvShapes()
    with spy:
        out = layer(xin, z)
    assert all(shape[1] == 1 for shape, _ in spy.calls), spy.calls  # depthwise only
    weight = layer.weight.contiguous()
    ref_rows = []
    for n in range(2):
        w = weight * layer.kernel_attention(x[n:n + 1], z[n:n + 1])[0] if modulated else weight
        ref_rows.append(torch.cat([
            F.conv2d(x[n:n + 1, g * per_group:(g + 1) * per_group], w[g:g + 1], layer.bias[g:g + 1],
                     padding=2, dilation=2) for g in range(groups)], 1))
    ref = torch.cat(ref_rows)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if layout == "channels_last":  # a photo (batch 1) stays channels-last
        one = layer(xin[:1], None if z is None else z[:1])
        assert one.stride() == _channels_last_strides(one.shape)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x, layer.weight], grad)
    want = torch.autograd.grad(ref, [x, layer.weight], grad)
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("modulated", [False, True])
def test_a_channels_last_depthwise_layer_keeps_its_layout(modulated):
    # A depthwise kernel (C,1,kh,kw) is the same memory in both layouts; PyTorch tells them apart by
    # the strides only. A channels-last model's per-sample depthwise kernels must carry the
    # channels-last strides too, or oneDNN hands back a default-layout map that the next sum copies
    # (IDT's LeFF in CoIC mode). A default-layout model stays default.
    torch.manual_seed(0)
    layer = ModulatedConv2d(6, 6, 3, 1, 1, groups=6, dim_in=5)
    _randomise_generator(layer)
    x, z = torch.randn(1, 6, 7, 9), (torch.randn(1, 5) if modulated else None)
    with torch.no_grad():
        out = layer(x, z)
        assert out.stride() == (6 * 7 * 9, 7 * 9, 9, 1)
        ref = F.conv2d(x, layer.weight * layer.kernel_attention(x, z)[0] if modulated else layer.weight,
                       layer.bias, padding=1, groups=6)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        layer.to(memory_format=torch.channels_last)
        # IDT's tokens seen as a map: (1, H*W, C) -> (1, C, H, W), a channels-last view
        tokens = x.permute(0, 2, 3, 1).reshape(1, 7 * 9, 6).contiguous()
        fmap = tokens.transpose(1, 2).reshape(1, 6, 7, 9)  # as models/idt.py's _to_map
        assert fmap.stride()[1:] == (1, 54, 6)
        out = layer(fmap, z)
        assert out.stride() == _channels_last_strides(out.shape)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
