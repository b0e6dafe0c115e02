"""S2O-NPDE losses (Eq. 8-9) and the perceptual loss's VGG read from torchvision-layout files."""

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

from cdiff.npde import GeneratorOutput, NPDEConfig, NPDELoss, NPDEModel, PMDHead, VGGFeatures, load_vgg, lsgan
from cdiff.weightfile import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


LAYERS = NPDEConfig().perceptual_layers


@pytest.mark.parametrize("arch, cfg, suffix", [("vgg16", "D", ".safetensors"), ("vgg19", "E", ".pth")])
def test_vgg_features_equal_torchvision(tmp_path, arch, cfg, suffix):
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    reference = make_layers(cfgs[cfg]).eval()  # torchvision's own `features`
    state = {f"features.{k}": v for k, v in reference.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)  # in the file, not used
    path = tmp_path / f"{arch}{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)

    vgg = load_vgg(path, LAYERS)
    assert NPDELoss.from_vgg_file(NPDEConfig.tiny(), path).vgg.arch == arch
    assert vgg.arch == arch and not any(p.requires_grad for p in vgg.parameters())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    x = ((images + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = {}
    with torch.no_grad():
        for i, layer in enumerate(reference):
            x = layer(x)
            expected[i] = x.clone()
    relu_index = {"vgg16": (1, 6, 11, 18, 25), "vgg19": (1, 6, 11, 20, 29)}[arch]  # relu1_1 .. relu5_1
    for name, got, i in zip(LAYERS, vgg(images), relu_index):
        torch.testing.assert_close(got, expected[i], rtol=1e-5, atol=1e-5, msg=name)


def test_vgg_files_that_do_not_fit_are_refused(tmp_path):
    from safetensors.torch import save_file

    bn = tmp_path / "vgg16_bn.safetensors"
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3), "features.1.running_mean": torch.zeros(64)}, bn)
    with pytest.raises(CheckpointError, match="vgg16_bn.safetensors: a batch-norm VGG"):
        load_vgg(bn, LAYERS)
    other = tmp_path / "other.safetensors"
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, other)
    with pytest.raises(CheckpointError, match="other.safetensors: expected torchvision VGG16 or VGG19.*found 1"):
        load_vgg(other, LAYERS)
    with pytest.raises(ValueError, match="no layers"):
        VGGFeatures("vgg16", ("relu6_1",))


def test_no_vgg_weights_turns_the_perceptual_loss_off_with_a_warning(caplog):
    config = NPDEConfig.tiny()
    with caplog.at_level(logging.WARNING, logger="cdiff.npde.losses"):
        losses = NPDELoss.from_vgg_file(config, None)
    assert "perceptual loss (weight 10) is off" in caplog.text
    pair = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    terms = losses.generator_terms(NPDEModel(config), pair[0], pair[1]).terms
    assert "perceptual" not in terms
    assert set(terms) == {"gan_eo", "gan_sar", "pixel", "cycle", "pde_tcd", "pde_pmd"}


def test_total_weights_every_term_as_eq_8():
    config = NPDEConfig.tiny()
    torch.manual_seed(0)
    losses = NPDELoss(config, VGGFeatures("vgg16", config.perceptual_layers))  # random VGG: only the sums matter
    sar, eo = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    out = losses.generator_terms(NPDEModel(config), sar, eo)
    t = {k: v.item() for k, v in out.terms.items()}
    assert t["perceptual"] > 0
    expected = t["gan_eo"] + t["gan_sar"] + 10 * (t["pixel"] + t["perceptual"] + t["cycle"] + t["pde_tcd"] + t["pde_pmd"])
    assert out.total.item() == pytest.approx(expected, rel=1e-6)
    assert losses.perceptual(eo, eo).item() == 0


class KnownGenerator(nn.Module):
    """Returns eo + shift as the optical image and ``side(eo)`` as the PMD image."""

    def __init__(self, eo, shift, side):
        super().__init__()
        self.eo, self.shift, self.side = eo, shift, side

    def forward(self, image, side_output=True):
        return GeneratorOutput(self.eo + self.shift, self.side(self.eo) if side_output else None)


class KnownModel(nn.Module):
    def __init__(self, generator):
        super().__init__()
        self.generator = generator
        self.reverse = lambda image: GeneratorOutput(image, None)
        self.disc_eo = self.disc_sar = lambda image: torch.ones(image.shape[0], 1, 2, 2)


def test_pde_terms_compare_edge_direction_residuals():
    config = NPDEConfig.tiny()
    losses = NPDELoss(config)
    phi = PMDHead(config.pmd_eps)
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    eo = torch.tanh(((x - 15.5) ** 2 + (y - 15.5) ** 2).sqrt() / 3 - 3).expand(1, 3, 32, 32)  # a disc: curved edges
    sar = torch.zeros_like(eo)
    # A brightness shift costs the pixel loss its size and the PDE loss nothing (phi ignores
    # constants); a PMD image equal to phi(y) costs nothing.
    terms = losses.generator_terms(KnownModel(KnownGenerator(eo, 0.1, phi)), sar, eo).terms
    assert terms["pixel"].item() == pytest.approx(0.1, rel=1e-5)
    assert terms["pde_tcd"].item() < 1e-7 and terms["pde_pmd"].item() == 0
    assert terms["gan_eo"].item() == 0  # the fake discriminator says "real"
    # An all-zero PMD image costs the mean size of phi(y), in the paper's units (4x the head's).
    terms = losses.generator_terms(KnownModel(KnownGenerator(eo, 0.0, torch.zeros_like)), sar, eo).terms
    assert terms["pde_pmd"].item() == pytest.approx(4 * phi(eo).abs().mean().item(), rel=1e-6)
    assert phi(eo).abs().mean() > 1e-3


def papers_phi(u: np.ndarray) -> np.ndarray:
    """Eq. 7 of the paper on (H, W) ``u``, by hand: its undivided stencils (u_x = u[x+1] - u[x-1],
    u_xx = u[x+2] - 2u[x] + u[x-2], u_xy = its [1, 0, -1; 0; -1, 0, 1]), mirrored borders, no eps
    (0 where the gradient is 0, where the numerator is 0 too)."""
    p = np.pad(u, 2, mode="reflect")
    c = p[2:-2, 2:-2]
    u_x, u_y = p[2:-2, 3:-1] - p[2:-2, 1:-3], p[3:-1, 2:-2] - p[1:-3, 2:-2]
    u_xx, u_yy = p[2:-2, 4:] - 2 * c + p[2:-2, :-4], p[4:, 2:-2] - 2 * c + p[:-4, 2:-2]
    u_xy = p[1:-3, 1:-3] - p[1:-3, 3:-1] - p[3:-1, 1:-3] + p[3:-1, 3:-1]
    numerator = u_x**2 * u_yy - 2 * u_x * u_y * u_xy + u_y**2 * u_xx
    denominator = 2 * (u_x**2 + u_y**2)
    return np.divide(numerator, denominator, out=np.zeros_like(u), where=denominator > 0)


def test_pde_loss_weighs_the_papers_phi_by_10():
    """Eq. 8-9 on step edges: the PDE terms are the L1 of the paper's phi (Eq. 7 with its own
    stencils, computed by hand above), and the total weighs them by 10."""
    config = NPDEConfig.tiny()
    y, x = np.mgrid[:24, :24].astype(np.float64)
    r = np.hypot(x - 11.5, y - 11.5)
    target, fake = np.where(r < 6, 1.0, -1.0), np.where(r < 4, 1.0, -1.0)  # discs: curved step edges
    phi_target, phi_fake = papers_phi(target), papers_phi(fake)
    # By hand at (y, x) = (12, 6), on the disc's left side: u(x - 1) = -1, u(x + 1) = 1, so u_x = 2;
    # u(y - 1) = u(y + 1) = 1, so u_y = 0; u(y - 2) = 1, u = 1, u(y + 2) = -1, so u_yy = -2;
    # Eq. 7: u_x^2 u_yy / (2 u_x^2) = -1 (the head's per-pixel stencils: -1/4).
    assert target[12, 5:8].tolist() == [-1, 1, 1] and target[10:15, 6].tolist() == [1, 1, 1, 1, -1]
    assert phi_target[12, 6] == -1 and set(np.unique(phi_target)) == {-1, 0, 1}
    head = PMDHead(config.pmd_eps)(torch.from_numpy(target)[None, None].float())[0, 0].double().numpy()
    np.testing.assert_allclose(4 * head, phi_target, rtol=1e-4, atol=1e-6)  # the head is a quarter of Eq. 7

    to_image = lambda u: torch.from_numpy(u).float().expand(1, 3, 24, 24)  # noqa: E731
    eo = to_image(target)
    model = KnownModel(KnownGenerator(to_image(fake), 0.0, torch.zeros_like))  # PMD image 0: L_PMD = |phi(y)|
    out = NPDELoss(config).generator_terms(model, torch.zeros_like(eo), eo)
    tcd, pmd = np.abs(phi_target - phi_fake).mean(), np.abs(phi_target).mean()
    assert out.terms["pde_tcd"].item() == pytest.approx(tcd, rel=1e-4) and tcd > 0.05
    assert out.terms["pde_pmd"].item() == pytest.approx(pmd, rel=1e-4) and pmd > 0.05
    t = {k: v.item() for k, v in out.terms.items()}
    others = t["gan_eo"] + t["gan_sar"] + 10 * (t["pixel"] + t["cycle"])
    assert out.total.item() - others == pytest.approx(10 * (tcd + pmd), rel=1e-4)


def test_pde_loss_switches():
    sar, eo = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    for config, expected in [
        (NPDEConfig.tiny(pde_loss=False), set()),
        (NPDEConfig.tiny(pmd=False), {"pde_tcd"}),
        (NPDEConfig.tiny(), {"pde_tcd", "pde_pmd"}),
    ]:
        terms = NPDELoss(config).generator_terms(NPDEModel(config), sar, eo).terms
        assert {k for k in terms if k.startswith("pde")} == expected


def test_least_squares_gan_and_discriminator_terms():
    scores = torch.tensor([0.5, 1.0, 0.0])
    assert lsgan(scores, True).item() == pytest.approx((0.25 + 0 + 1) / 3)
    assert lsgan(scores, False).item() == pytest.approx((0.25 + 1 + 0) / 3)
    model = KnownModel(None)  # D says 1 everywhere: real terms 0, fake terms 1, halved
    zeros = torch.zeros(1, 3, 8, 8)
    d = NPDELoss(NPDEConfig.tiny()).discriminator_terms(model, zeros, zeros, zeros, zeros)
    assert d["disc_eo"].item() == 0.5 and d["disc_sar"].item() == 0.5
