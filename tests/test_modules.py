"""The model's contract: shapes, nearest-code search, straight-through gradients, loss weighting, EMA."""
import pytest
import torch
import torch.nn.functional as F

from imaging.quality import ssim
from modules import PRESETS, VQVAE, ConfigError, VectorQuantizer, VQVAEConfig, config_from_dict, kmeans


def test_seed_preset_reproduces_the_first_reports_shapes():
    model = VQVAE(PRESETS["seed"].model).eval()
    x = torch.randn(2, 1, 256, 256)
    shapes = []
    h = x
    for block in model.encoder.down:
        h = block(h)
        shapes.append(tuple(h.shape))
    assert shapes == [(2, 128, 128, 128), (2, 128, 64, 64), (2, 128, 32, 32)]
    assert isinstance(model.encoder.project, torch.nn.Identity)  # no extra layers beyond the recipe
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    assert len([m for m in model.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]) == 3
    assert model.quantizer.codebook.shape == (32, 128)
    out = model(x)
    assert out.reconstruction.shape == x.shape and out.indices.shape == (2, 32, 32)
    assert out.reconstruction.abs().max() <= 1  # tanh output


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_handles_adni_sized_images(name):
    cfg = PRESETS[name].model
    model = VQVAE(cfg).eval()
    out = model(torch.randn(1, 1, 240, 256))
    assert out.reconstruction.shape == (1, 1, 240, 256)
    assert out.indices.shape == (1, *cfg.latent_grid(240, 256))


def test_image_size_not_divisible_by_the_downsampling_factor_is_refused():
    with pytest.raises(ValueError, match="not divisible"):
        PRESETS["seed"].model.latent_grid(100, 96)


def test_invalid_and_huge_config_values_are_refused_before_anything_is_allocated():
    for field, value in (("codebook_size", 1), ("codebook_size", 10**10), ("hidden_channels", 100000),
                         ("ema_decay", 1.0), ("norm", "layer")):
        with pytest.raises(ConfigError, match=field) as e:
            VQVAEConfig(**{field: value})
        assert e.value.field == field and e.value.value == value


def test_a_config_from_a_file_is_checked_for_unknown_fields_and_types_and_removed_fields_load_at_their_value():
    assert VQVAEConfig.from_dict({"in_channels": 1, "reconstruction_loss": "mse"}) == VQVAEConfig()
    for bad, match in (({"in_channels": 3}, "unknown"), ({"hidden_channels": "16"}, "hidden_channels"),
                       ({"kmeans_init": 1}, "kmeans_init"), ({"codebook_size": True}, "codebook_size")):
        with pytest.raises(ValueError, match=match):
            VQVAEConfig.from_dict(bad)
    assert config_from_dict(VQVAEConfig, {"commitment_cost": 1}).commitment_cost == 1  # an int where a float goes


def test_quantiser_indices_equal_brute_force_argmin():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 8).eval()
    z = torch.randn(3, 8, 5, 4)
    out = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    brute = torch.stack([((v - vq.codebook) ** 2).sum(1).argmin() for v in flat]).view(3, 5, 4)
    assert torch.equal(out.indices, brute)
    assert torch.equal(vq.quantize_indices(z), brute)


def test_quantiser_distances_stay_fp32_under_autocast():
    vq = VectorQuantizer(16, 8).eval()
    z = torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z.bfloat16())
    assert out.quantized.dtype == torch.float32
    assert torch.equal(out.indices, vq(z).indices)


def test_straight_through_estimator_passes_the_decoder_gradient_to_the_encoder():
    vq = VectorQuantizer(8, 4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    upstream = torch.randn_like(out.quantized)
    (out.quantized * upstream).sum().backward()
    assert torch.allclose(z.grad, upstream)
    assert vq.codebook.grad is None  # the decoder path does not reach the codebook


def test_codebook_gets_gradient_only_from_the_codebook_term_and_beta_scales_commitment():
    torch.manual_seed(0)
    z, codebook = torch.randn(2, 4, 3, 3), torch.randn(8, 4)
    losses = {}
    for beta in (0.25, 1.0):
        vq = VectorQuantizer(8, 4, commitment_cost=beta)
        vq.codebook.data.copy_(codebook)
        zz = z.clone().requires_grad_(True)
        out = vq(zz)
        out.commitment_loss.backward(retain_graph=True)
        assert vq.codebook.grad is None  # commitment term: encoder only
        commitment_grad = zz.grad.clone()
        zz.grad = None
        out.codebook_loss.backward()
        assert zz.grad is None or torch.all(zz.grad == 0)  # codebook term: codebook only
        assert vq.codebook.grad.abs().sum() > 0
        losses[beta] = (out.codebook_loss.item(), out.commitment_loss.item(), commitment_grad)
    assert losses[0.25][0] == pytest.approx(losses[1.0][0])
    assert losses[0.25][1] == pytest.approx(0.25 * losses[1.0][1])
    assert torch.allclose(losses[0.25][2], 0.25 * losses[1.0][2])


def test_indices_round_trip_to_the_same_codes_and_images():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(hidden_channels=16, embedding_dim=16)).eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    out = model(x)
    indices = model.encode(x)
    assert torch.equal(indices, out.indices)
    assert torch.allclose(model.quantizer.lookup(indices), model.quantizer(model.encoder(x)).quantized)
    assert torch.allclose(model.decode_indices(indices), out.reconstruction, atol=1e-6)


def test_forward_losses_are_named_and_sum_to_the_training_loss():
    model = VQVAE(VQVAEConfig(hidden_channels=16, embedding_dim=16))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    out = model(x)
    assert set(out.losses) == {"reconstruction", "codebook", "commitment"}
    assert out.losses["reconstruction"].item() == pytest.approx(F.mse_loss(out.reconstruction, x).item(), rel=1e-5)
    assert out.code_counts.sum() == 2 * 4 * 4


def test_ssim_weight_adds_the_scored_ssim_deficit_to_the_reconstruction_loss_and_trains_through_it():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    model = VQVAE(VQVAEConfig(hidden_channels=16, embedding_dim=16, ssim_weight=0.5))
    out = model(x)
    unit = lambda t: (t + 1) / 2  # noqa: E731 - scoring is on [0, 1]
    expected = F.mse_loss(out.reconstruction, x) + 0.5 * (1 - ssim(unit(out.reconstruction), unit(x))).mean()
    assert out.losses["reconstruction"].item() == pytest.approx(expected.item(), rel=1e-5)

    # the SSIM term alone reaches the decoder's weights
    x_hat = model.decoder(model.quantizer(model.encoder(x)).quantized)
    mse_only = torch.autograd.grad(F.mse_loss(x_hat, x), model.decoder.to_image.weight, retain_graph=True)[0]
    both = torch.autograd.grad(model.reconstruction_loss(x_hat, x), model.decoder.to_image.weight)[0]
    assert (both - mse_only).abs().max() > 1e-4

def test_ema_with_zero_decay_moves_used_codes_to_their_mean_and_leaves_unused_ones():
    vq = VectorQuantizer(3, 2, update="ema", ema_decay=0.0, eps=0.0)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-50.0, 50.0]]))
    z = torch.tensor([[1.0, 1.0], [3.0, 1.0], [9.0, 9.0]]).t().reshape(1, 2, 1, 3)
    vq(z)
    assert torch.allclose(vq.codebook, torch.tensor([[2.0, 1.0], [9.0, 9.0], [-50.0, 50.0]]))
    assert not any(p is vq.codebook for p in vq.parameters())  # the optimiser never touches an EMA codebook


def test_eval_mode_leaves_every_codebook_statistic_unchanged():
    vq = VectorQuantizer(4, 2, update="ema", kmeans_init=True, dead_code_threshold=1.0).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(2, 2, 3, 3))
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())


def test_kmeans_initialisation_places_codes_on_the_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[-5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    points = (centres.repeat_interleave(50, 0) + 0.1 * torch.randn(150, 2))
    found = kmeans(points, 3)
    assert torch.cdist(centres, found).min(1).values.max() < 0.5
    vq = VectorQuantizer(3, 2, update="ema", kmeans_init=True).train()
    vq(points.t().reshape(1, 2, 10, 15))
    assert bool(vq.initialised) and torch.cdist(centres, vq.codebook).min(1).values.max() < 0.5


def test_dead_codes_restart_on_encoder_outputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, update="loss", ema_decay=0.0, dead_code_threshold=0.5).train()
    vq.codebook.data.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [200.0, 200.0], [300.0, 300.0]]))
    z = torch.randn(1, 2, 4, 4) * 0.1  # every vector picks code 0: codes 1-3 are dead
    vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for code in vq.codebook[1:]:
        assert torch.isclose(flat, code).all(1).any()  # moved onto one of this batch's vectors


@pytest.mark.parametrize("update", ["ema", "loss"])
def test_a_vector_is_quantised_to_the_code_it_was_assigned_even_if_that_code_restarts_in_the_same_step(update):
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 2, update=update, ema_decay=0.5, dead_code_threshold=2.0).train()
    vq.codebook.data.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    vq.usage.copy_(torch.tensor([5.0, 0.0]))  # code 1 is dead and restarts in this step
    z = torch.tensor([[0.1, -0.1], [0.0, 0.2], [-0.2, 0.0], [10.0, 10.0]]).t().reshape(1, 2, 1, 4)
    out = vq(z)
    assert out.indices.flatten().tolist() == [0, 0, 0, 1]
    assert torch.equal(out.quantized[0, :, 0, 3], torch.tensor([10.0, 10.0]))  # the code as it was when chosen
    assert out.commitment_loss.item() == pytest.approx(0.25 * (0.01 + 0.01 + 0.04 + 0.04 + 0 + 0) / 8, rel=1e-5)
    assert vq.usage[1].item() == 2.0  # and only then was it restarted


def test_encoding_under_bf16_autocast_picks_the_codes_of_the_fp32_forward_and_decodes_bit_for_bit():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(hidden_channels=16, embedding_dim=8, codebook_size=64, downsamplings=2)).eval()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            codes = model.encode(x)
            out = model(x)
        assert torch.equal(codes, out.indices)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = model.encoder(x)
        assert torch.equal(codes, model.quantizer.quantize_indices(z))  # the distances of either in fp32
        plain = model(x)
        assert torch.equal(model.decode_indices(plain.indices), plain.reconstruction)  # eval: the codes themselves
