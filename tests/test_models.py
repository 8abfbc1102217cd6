"""Tests of the noise-prediction networks: the model contract (shapes, dtypes, t handling),
initialisation invariants, closed forms of the time embeddings, and input validation."""
import math

import pytest
import torch

from configs.default import get_default_config
from sde.models import MODELS, ToyMLP, UNet, count_parameters, create_model
from sde.models.embeddings import (DDPM_NUM_STEPS, SINUSOIDAL_MAX_PERIOD, GaussianFourierEmbedding,
                                   SinusoidalEmbedding, TimeEmbedding)
from sde.models.unet import (DROPOUT_MASK_BITS, AttentionBlock, Dropout, ResBlock, attention,
                             group_norm, norm_groups)

EMBEDDINGS = ("positional", "fourier")


def small_unet(in_channels=1, image_size=28, **overrides) -> UNet:
    """A narrow U-Net with attention at a non-bottleneck level, so every block type runs."""
    arguments = dict(in_channels=in_channels, image_size=image_size, nf=16, ch_mult=(1, 2, 2),
                     num_res_blocks=1, attn_resolutions=(image_size // 2,), dropout=0.1)
    arguments.update(overrides)
    return UNet(**arguments)


def perturb_zero_parameters_(model: torch.nn.Module, std: float = 0.05) -> None:
    """Stand-in for a few training steps: give every all-zero parameter (zero-initialised
    convs and biases) small random values."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, std)


def image_cases():
    return [((1, 28, 28), dict()), ((3, 32, 32), dict(ch_mult=(1, 2, 2, 2)))]


@pytest.mark.parametrize("shape, overrides", image_cases())
def test_unet_output_has_input_shape_and_is_zero_at_init(shape, overrides):
    torch.manual_seed(0)
    model = small_unet(shape[0], shape[1], **overrides)
    x, t = torch.randn(3, *shape), torch.rand(3)
    eps = model(x, t)
    assert eps.shape == x.shape and eps.dtype == x.dtype
    assert torch.count_nonzero(eps) == 0  # zero-initialised final conv
    perturb_zero_parameters_(model)
    eps = model(x, t)
    assert eps.shape == x.shape and torch.count_nonzero(eps) == eps.numel()


def test_toy_mlp_output_shape_and_zero_at_init():
    torch.manual_seed(0)
    model = ToyMLP(dim=2, hidden=32, num_layers=3)
    x, t = torch.randn(5, 2), torch.rand(5)
    eps = model(x, t)
    assert eps.shape == (5, 2) and torch.count_nonzero(eps) == 0
    perturb_zero_parameters_(model)
    assert torch.count_nonzero(model(x, t)) == 10


@pytest.mark.parametrize("make_model, x_shape", [
    (lambda: small_unet(3, 16, ch_mult=(1, 2), attn_resolutions=(8,)), (2, 3, 16, 16)),
    (lambda: ToyMLP(dim=2, hidden=16, num_layers=2), (4, 2)),
])
def test_gradient_reaches_every_parameter(make_model, x_shape):
    torch.manual_seed(0)
    model = make_model()
    perturb_zero_parameters_(model)
    loss = model(torch.randn(x_shape), torch.rand(x_shape[0])).square().sum()
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_zero_initialised_blocks_are_rescaled_identities():
    """At init each residual branch is zero: a block maps x to x / sqrt(2) (skip_rescale) or x."""
    torch.manual_seed(0)
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 64)
    for skip_rescale, scale in ((True, 1 / math.sqrt(2)), (False, 1.0)):
        block = ResBlock(16, 16, time_dim=64, dropout=0.0, skip_rescale=skip_rescale)
        torch.testing.assert_close(block(x, temb), x * scale)
        attention = AttentionBlock(16, skip_rescale=skip_rescale)
        torch.testing.assert_close(attention(x), x * scale)


@pytest.mark.parametrize("embedding_type", EMBEDDINGS)
@pytest.mark.parametrize("make_model, x_shape", [
    (lambda kind: small_unet(embedding_type=kind, dropout=0.0), (2, 1, 28, 28)),
    (lambda kind: ToyMLP(hidden=32, embedding_type=kind), (2, 2)),
])
def test_output_depends_on_t(embedding_type, make_model, x_shape):
    torch.manual_seed(0)
    model = make_model(embedding_type)
    perturb_zero_parameters_(model)
    x = torch.randn(x_shape)
    early, late = model(x, torch.full((2,), 0.1)), model(x, torch.full((2,), 0.9))
    assert (early - late).abs().max() > 1e-3 * early.abs().max()
    # neighbouring DDPM steps (t = i / 1000) are told apart too
    step, next_step = model(x, torch.full((2,), 0.5)), model(x, torch.full((2,), 0.501))
    assert not torch.allclose(step, next_step)


def test_sinusoidal_embedding_closed_form():
    """Eq. (1): t = i / 1000 embeds DDPM's integer step i with frequencies 10000^(-k/(d/2-1))."""
    dim = 8
    embedding = SinusoidalEmbedding(dim)
    steps = torch.tensor([1.0, 7.0, 500.0, 1000.0])
    features = embedding(steps / DDPM_NUM_STEPS)
    half = dim // 2
    for k in range(half):
        omega = SINUSOIDAL_MAX_PERIOD ** (-k / (half - 1))
        torch.testing.assert_close(features[:, k], torch.sin(steps * omega))
        torch.testing.assert_close(features[:, half + k], torch.cos(steps * omega))
    assert "frequencies" not in embedding.state_dict()  # derived, not stored


def test_fourier_features_are_fixed_gaussian_buffer():
    torch.manual_seed(0)
    scale, dim = 16.0, 4096
    embedding = GaussianFourierEmbedding(dim, scale)
    assert list(embedding.parameters()) == []            # not trained
    assert "weight" in embedding.state_dict()            # but saved with the checkpoint
    weight = embedding.weight
    assert abs(weight.std().item() / scale - 1) < 0.05   # W ~ N(0, scale^2), sd of std ~ 1.1%
    t = torch.tensor([0.0, 0.3, 1.0])
    features = embedding(t)
    angles = 2 * math.pi * t[:, None] * weight[None, :]
    torch.testing.assert_close(features, torch.cat([angles.sin(), angles.cos()], dim=1))


def test_fourier_buffer_round_trips_through_state_dict():
    torch.manual_seed(0)
    model = small_unet(embedding_type="fourier", dropout=0.0)
    perturb_zero_parameters_(model)
    torch.manual_seed(1)
    fresh = small_unet(embedding_type="fourier", dropout=0.0)
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    assert not torch.equal(fresh.time_embedding.features.weight, model.time_embedding.features.weight)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x, t), model(x, t))


def test_scalar_t_broadcasts_over_the_batch():
    torch.manual_seed(0)
    model = small_unet(dropout=0.0)
    perturb_zero_parameters_(model)
    x = torch.randn(3, 1, 28, 28)
    expected = model(x, torch.full((3,), 0.25))
    torch.testing.assert_close(model(x, torch.tensor(0.25)), expected)
    torch.testing.assert_close(model(x, 0.25), expected)
    torch.testing.assert_close(model(x, torch.full((3,), 0.25, dtype=torch.float64)), expected)


def test_channels_last_layout_changes_memory_not_numbers():
    """The NHWC default and the NCHW layout compute the same eps and gradients, the weights
    round-trip between them, and the output comes back in the input's (contiguous) layout."""
    torch.manual_seed(0)
    nhwc = small_unet(dropout=0.0, in_channels=3)
    perturb_zero_parameters_(nhwc)
    nchw = small_unet(dropout=0.0, in_channels=3, channels_last=False)
    nchw.load_state_dict(nhwc.state_dict())
    assert nhwc.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t = torch.randn(4, 3, 28, 28), torch.rand(4)
    outputs = [model(x, t) for model in (nhwc, nchw)]
    assert outputs[0].is_contiguous()
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for output in outputs:
        output.square().sum().backward()
    for (name, a), b in zip(nhwc.named_parameters(), nchw.parameters()):
        # summation order differs between the layouts: compare in norm, at float32 precision
        assert (a.grad - b.grad).norm() <= 1e-5 * b.grad.norm() + 1e-8, name


@pytest.mark.parametrize("embedding_type", EMBEDDINGS)
def test_bf16_autocast_matches_fp32(embedding_type):
    torch.manual_seed(0)
    model = small_unet(embedding_type=embedding_type, dropout=0.0)
    perturb_zero_parameters_(model)
    x, t = torch.randn(4, 1, 28, 28), torch.rand(4)
    reference = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_precision = model(x, t)
    assert low_precision.dtype == x.dtype
    relative_error = (low_precision - reference).norm() / reference.norm()
    assert relative_error < 0.05  # bf16 has an 8-bit mantissa (~0.4% per rounding)


def test_float64_copy_runs_in_float64_and_matches_float32():
    """The likelihood benchmark's reference is ``copy.deepcopy(model).double()``."""
    torch.manual_seed(0)
    model = small_unet(dropout=0.0)
    perturb_zero_parameters_(model)
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    output = model.double()(x.double(), t.double())
    assert output.dtype == torch.float64
    reference = model.float()(x, t)
    torch.testing.assert_close(output.float(), reference, rtol=1e-4, atol=1e-5)


def test_group_norm_takes_float32_statistics_and_keeps_the_input_dtype():
    norm = group_norm(64)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = (3.0 + torch.randn(2, 64, 8, 8)).to(memory_format=torch.channels_last)
    reference = torch.nn.functional.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    low = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = [norm(low), norm(x)]
    assert outputs[0].dtype == torch.bfloat16 and outputs[1].dtype == torch.float32
    torch.testing.assert_close(outputs[1], reference, rtol=1e-6, atol=1e-6)
    # bf16 in: the float32 normalization of the bf16 values, rounded once at the end
    of_rounded = torch.nn.functional.group_norm(low.float(), norm.num_groups, norm.weight,
                                                norm.bias, norm.eps)
    assert torch.equal(outputs[0], of_rounded.bfloat16())


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout():
    torch.manual_seed(0)
    model = small_unet(dropout=0.5)
    perturb_zero_parameters_(model)
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    model.eval()
    torch.testing.assert_close(model(x, t), model(x, t), rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(x, t), model(x, t))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_drops_at_the_realised_rate_in_every_quarter_of_a_draw(p):
    """Each 64-bit draw masks four consecutive elements; every one of the four positions must
    be dropped at the realised rate round(p 2^15) / 2^15 (a lost random bit in any 16-bit
    quarter would halve or double its rate)."""
    levels = 2 ** DROPOUT_MASK_BITS
    rate = round(p * levels) / levels
    torch.manual_seed(0)
    dropped = (Dropout(p).train()(torch.ones(400_000)) == 0).double().view(-1, 4)
    sigma = math.sqrt(rate * (1 - rate) / dropped.shape[0])
    assert torch.all((dropped.mean(0) - rate).abs() < 5 * sigma), dropped.mean(0)
    pairs = dropped[:, 0] * dropped[:, 1]  # neighbours independent: P(both) = rate^2
    assert abs(pairs.mean().item() - rate ** 2) < 5 * math.sqrt(rate ** 2 / dropped.shape[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_scales_kept_elements_by_the_realised_rate_with_one_rounding(dtype):
    levels = 2 ** DROPOUT_MASK_BITS
    scale = levels / (levels - round(0.1 * levels))
    torch.manual_seed(0)
    x = (torch.rand(8, 16, 9, 9) + 0.5).to(dtype).to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = Dropout(0.1).train()(x)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    keep = (out != 0).to(torch.float32)
    assert 0.8 < keep.mean().item() < 0.97
    assert torch.equal(out, (x.detach().float() * keep * scale).to(dtype))
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad.float(), keep * scale, rtol=4e-3 if dtype == torch.bfloat16 else 1e-6,
                               atol=0)


def test_cpu_dropout_edge_cases_and_determinism():
    x = torch.rand(3, 5, 7) + 1
    for layer in (Dropout(0.3).eval(), Dropout(0.0).train()):
        assert torch.equal(layer(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    strided = x[:, ::2, 1:]  # not dense: the mask is laid out in its logical order
    torch.manual_seed(1)
    first = Dropout(0.3).train()(strided)
    torch.manual_seed(1)
    assert torch.equal(first, Dropout(0.3).train()(strided.contiguous()))
    assert first.shape == strided.shape and 0 < (first == 0).sum() < first.numel()


def test_explicit_training_attention_matches_the_fused_kernel_in_value_and_gradient():
    """With gradients on CPU ``attention`` takes the explicit softmax product; it must agree
    with ``scaled_dot_product_attention`` (the no-grad path) in values and gradients."""
    torch.manual_seed(0)
    leaves = [torch.randn(3, 2, 49, 16, requires_grad=True) for _ in range(3)]
    explicit = attention(*leaves)
    assert "ScaledDotProduct" not in type(explicit.grad_fn).__name__  # the explicit path ran
    grads = torch.autograd.grad(explicit, leaves, torch.ones_like(explicit))
    detached = [leaf.detach().requires_grad_(True) for leaf in leaves]
    fused = torch.nn.functional.scaled_dot_product_attention(*detached)
    fused_grads = torch.autograd.grad(fused, detached, torch.ones_like(fused))
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, fused_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(attention(*leaves), fused, rtol=1e-5, atol=1e-6)


def test_norm_groups_divide_channels_with_at_least_four_per_group():
    assert [norm_groups(c) for c in (3, 16, 32, 64, 96, 128, 256, 200)] == [1, 4, 8, 16, 24, 32, 32, 25]
    for channels in range(1, 300):
        groups = norm_groups(channels)
        assert channels % groups == 0
        assert groups == 1 or channels // groups >= 4


def test_bad_image_size_and_attention_resolution_raise():
    with pytest.raises(ValueError, match="divisible by 2"):
        UNet(in_channels=1, image_size=28, ch_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="attn_resolutions"):
        UNet(in_channels=1, image_size=28, attn_resolutions=(16,))


def test_bad_inputs_raise():
    model = small_unet()
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2, 3, 28, 28), torch.rand(2))
    with pytest.raises(ValueError, match="t must have shape"):
        model(torch.randn(2, 1, 28, 28), torch.rand(3))
    with pytest.raises(ValueError, match="ToyMLP expects"):
        ToyMLP()(torch.randn(2, 3), torch.rand(2))
    with pytest.raises(ValueError, match="embedding_type"):
        small_unet(embedding_type="learned")
    with pytest.raises(ValueError, match="even dimension"):
        TimeEmbedding("fourier", feature_dim=7, out_dim=8, fourier_scale=16.0)


def test_parameter_count_is_deterministic_and_matches_closed_form():
    torch.manual_seed(0)
    first = count_parameters(create_model(get_default_config()))
    torch.manual_seed(1)
    assert count_parameters(create_model(get_default_config())) == first == 1_112_801
    dim, hidden, layers = 2, 32, 3
    dense = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    expected = (2 * dense(hidden, hidden)                                # time embedding MLP
                + dense(dim, hidden) + (layers - 1) * dense(hidden, hidden)  # hidden layers
                + layers * dense(hidden, hidden)                         # per-layer time inputs
                + dense(hidden, dim))                                    # output
    assert count_parameters(ToyMLP(dim, hidden, layers, embedding_type="fourier")) == expected


def test_create_model_reads_the_config():
    config = get_default_config()
    config.model.nf, config.data.num_channels, config.data.image_size = 16, 3, 32
    config.model.ch_mult, config.model.attn_resolutions = (1, 2, 2, 2), (16,)
    model = create_model(config)
    assert isinstance(model, UNet) and model.conv_in.out_channels == 16
    assert model(torch.randn(1, 3, 32, 32), torch.rand(1)).shape == (1, 3, 32, 32)

    config = get_default_config()
    config.data.dataset, config.model.name, config.model.nf, config.model.num_layers = "toy", "mlp", 64, 4
    model = create_model(config)
    assert isinstance(model, ToyMLP) and len(model.layers) == 4 and model.out.in_features == 64

    config.model.name = "transformer"
    with pytest.raises(ValueError, match="unknown model.name 'transformer'; accepted: unet, mlp, exact"):
        create_model(config)
    config.model.name = "unet"
    with pytest.raises(ValueError, match=r"data.dataset='toy' \(points data\) needs model.name='mlp' or 'exact'"):
        create_model(config)
    assert sorted(MODELS) == ["exact", "mlp", "unet"]


@pytest.mark.slow
def test_forward_traces_without_graph_breaks():
    """torch.compile(fullgraph=True) fails on any python-side data-dependent branch; the
    'eager' backend traces with dynamo without paying for code generation."""
    torch.manual_seed(0)
    model = small_unet(3, 16, ch_mult=(1, 2), attn_resolutions=(8,), dropout=0.0)
    perturb_zero_parameters_(model)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, t), model(x, t))
