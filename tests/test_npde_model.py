"""S2O-NPDE networks: the TCD recurrence by hand, shapes, ablation switches, translate."""

import pytest
import torch
import torch.nn as nn

from cdiff.npde import TABLE2_ROWS, NPDEConfig, NPDEGenerator, NPDEModel, translate
from cdiff.npde.model import ResidualBlock, TCDBlock

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


class Square(nn.Module):
    """A known df: u -> -u^2 / 4."""

    def forward(self, u):
        return -u.square() / 4


class SumHalves(nn.Module):
    """A known fusion block: concat(p, u) -> p + u."""

    def forward(self, pu):
        p, u = pu.chunk(2, dim=1)
        return p + u


def bare_generator(tcd: bool, pmd: bool) -> NPDEGenerator:
    """A generator whose encoders and decoders pass features through and whose df and fusion
    blocks are the known functions above, so its output is the recurrence alone."""
    g = NPDEGenerator(NPDEConfig.tiny(tcd=tcd, pmd=pmd), 1, 1, with_pmd=pmd)
    g.encoder = g.decoder = nn.Identity()
    for block in g.blocks:
        block.delta = Square()
    if pmd:
        g.pmd_head = g.pmd_encoder = g.pmd_decoder = nn.Identity()
        g.fusions = nn.ModuleList([SumHalves(), SumHalves()])
    return g


def test_tcd_recurrence_by_hand():
    # u_0 = 2, df(u) = -u^2 / 4, u_{-1} = u_{-2} = u_0:
    # u_1 = 2 + 0 - 0 - 1                              = 1
    # u_2 = 1 + (1 - 2) / 2 - (2 - 2) / 2 - 1 / 4       = 0.25
    # u_3 = 0.25 + (0.25 - 1) / 2 - (1 - 2) / 2 - 1/64 = 0.359375
    u0 = torch.full((1, 1, 4, 4), 2.0)
    out = bare_generator(tcd=True, pmd=False)(u0)
    torch.testing.assert_close(out.image, torch.full_like(u0, 0.359375), rtol=0, atol=1e-7)
    assert out.pmd_image is None
    # Base's plain blocks: u_1 = 2 - 1 = 1, u_2 = 1 - 1/4 = 0.75, u_3 = 0.75 - 0.140625 = 0.609375
    out = bare_generator(tcd=False, pmd=False)(u0)
    torch.testing.assert_close(out.image, torch.full_like(u0, 0.609375), rtol=0, atol=1e-7)


def test_tcd_recurrence_with_fusion_by_hand():
    # p_0 = u_0 = 2; fusion: p_k = p_{k-1} + u_k, then u_k <- u_k + p_k; the history keeps
    # the states after the fusion:
    # u_1 = 1;   p_1 = 2 + 1 = 3;   u_1 <- 4
    # u_2 = 4 + (4 - 2) / 2 - 0 - 16 / 4 = 1;   p_2 = 3 + 1 = 4;   u_2 <- 5
    # u_3 = 5 + (5 - 4) / 2 - (4 - 2) / 2 - 25 / 4 = -1.75;   PMD image = p_2 = 4
    u0 = torch.full((1, 1, 4, 4), 2.0)
    out = bare_generator(tcd=True, pmd=True)(u0)
    torch.testing.assert_close(out.image, torch.full_like(u0, -1.75), rtol=0, atol=1e-7)
    torch.testing.assert_close(out.pmd_image, torch.full_like(u0, 4.0), rtol=0, atol=1e-7)


def test_tcd_block_with_known_weights():
    # df = conv-ReLU-conv with 1x1 identity-like weights (norm off): df(u) = relu(u) * 3.
    block = TCDBlock(2, "none")
    for conv in (block.delta[0][1], block.delta[1][1]):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        conv.weight.data[:, :, 1, 1] = torch.eye(2)
    block.delta[1][1].weight.data *= 3
    u, u1, u2 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0]), torch.tensor([0.0, 4.0])
    grid = lambda v: v.view(1, 2, 1, 1).expand(1, 2, 3, 3)  # noqa: E731
    # channel 0: 1 + (1 - 0.5)/2 - (0.5 - 0)/2 + 3 = 4;  channel 1: -2 + (-3)/2 - (-3)/2 + 0 = -2
    out = block(grid(u), grid(u1), grid(u2))
    torch.testing.assert_close(out, grid(torch.tensor([4.0, -2.0])), rtol=0, atol=1e-6)


def test_shapes_at_the_tiny_preset():
    model = NPDEModel(NPDEConfig.tiny())
    sar = torch.rand(2, 3, 64, 48) * 2 - 1
    out = model.generator(sar)
    assert out.image.shape == out.pmd_image.shape == (2, 3, 64, 48)
    assert out.image.abs().max() <= 1 and out.pmd_image.abs().max() <= 1
    back = model.reverse(out.image)
    assert back.image.shape == (2, 3, 64, 48) and back.pmd_image is None
    assert model.disc_eo(out.image).shape == (2, 1, 64 // 8 - 2, 48 // 8 - 2)
    assert model.disc_sar(sar).shape == (2, 1, 6, 4)
    with pytest.raises(ValueError, match="multiples of 4"):
        model.generator(torch.zeros(1, 3, 30, 32))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_ablation_switches_change_the_graph():
    full = NPDEGenerator(NPDEConfig.tiny(), 3, 3, with_pmd=True)
    no_pmd = NPDEGenerator(NPDEConfig.tiny(pmd=False), 3, 3, with_pmd=False)
    no_tcd = NPDEGenerator(NPDEConfig.tiny(tcd=False), 3, 3, with_pmd=True)
    # PMD off: no PMD head, encoder, fusion or decoder, no side output.
    names = [n for n, _ in no_pmd.named_parameters()]
    assert not any(n.startswith(("pmd_", "fusions")) for n in names)
    assert not hasattr(no_pmd, "pmd_head") and no_pmd(torch.zeros(1, 3, 16, 16)).pmd_image is None
    pmd_names = [n for n, _ in full.named_parameters() if n.startswith(("pmd_", "fusions"))]
    assert sum(p.numel() for n, p in full.named_parameters() if n in pmd_names) == count(full) - count(no_pmd)
    # TCD off: the same weights in plain residual blocks (TCD adds no parameter, only the
    # recurrence), so loading the TCD model's weights gives a different output.
    assert all(isinstance(b, TCDBlock) for b in full.blocks)
    assert all(isinstance(b, ResidualBlock) for b in no_tcd.blocks)
    assert len(full.blocks) == len(no_tcd.blocks) == 3 and count(full) == count(no_tcd)
    no_tcd.load_state_dict(full.state_dict())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert not torch.allclose(full(x).image, no_tcd(x).image)
    # the reverse generator never has the PMD module
    assert not NPDEModel(NPDEConfig.tiny()).reverse.with_pmd


def test_table2_rows():
    assert NPDEConfig.ablation("Base") == NPDEConfig.paper(tcd=False, pmd=False, pde_loss=False)
    assert NPDEConfig.ablation("+TCD") == NPDEConfig.paper(tcd=True, pmd=False, pde_loss=False)
    assert NPDEConfig.ablation("+PMD") == NPDEConfig.paper(tcd=False, pmd=True, pde_loss=True)
    assert NPDEConfig.ablation("+TCD+PMD") == NPDEConfig.paper()
    assert NPDEConfig.ablation("base", NPDEConfig.tiny()).base_channels == 8
    assert set(TABLE2_ROWS) == {"base", "+tcd", "+pmd", "+tcd+pmd"}
    with pytest.raises(ValueError, match="another paper"):
        NPDEConfig.ablation("+RK2+PMD")
    with pytest.raises(ValueError, match="unknown Table 2 row"):
        NPDEConfig.ablation("+grad")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="norm"):
        NPDEConfig(norm="group")
    with pytest.raises(ValueError, match="n_fusion"):
        NPDEConfig(n_fusion=3)
    with pytest.raises(ValueError, match="lsgan"):
        NPDEConfig(gan_loss="vanilla")


def conv(k: int, cin: int, cout: int, bias: bool = True) -> int:
    return k * k * cin * cout + (cout if bias else 0)


def test_paper_preset_sizes_follow_the_architecture():
    """The parameter counts of NPDEConfig.paper(), from the architecture the papers describe, not
    from this build: CycleGAN's ResnetGenerator (ngf 64, two downsamplings, S2O-NPDE's three
    residual blocks; instance norm, so every conv has a bias) and its 70x70 PatchGAN (ndf 64, three
    layers); the PMD module mirrors the backbone (encoder, two fusion blocks of three convs over
    [PMD | backbone] features, decoder), and TCD blocks add no weight."""
    encoder = conv(7, 3, 64) + conv(3, 64, 128) + conv(3, 128, 256)  # c7s1-64, d128, d256
    blocks = 3 * 2 * conv(3, 256, 256)  # three residual blocks of two 3x3 convs
    decoder = conv(3, 256, 128) + conv(3, 128, 64) + conv(7, 64, 3)  # u128, u64 (transposed), c7s1-3
    resnet = encoder + blocks + decoder
    fusions = 2 * (conv(3, 512, 256) + 2 * conv(3, 256, 256))
    pmd = encoder + fusions + decoder  # phi itself is a fixed finite-difference stencil
    patchgan = conv(4, 3, 64) + conv(4, 64, 128) + conv(4, 128, 256) + conv(4, 256, 512) + conv(4, 512, 1)
    model = NPDEModel(NPDEConfig.paper())
    assert count(model.reverse) == resnet == 4_297_219
    assert count(model.generator) == resnet + pmd
    assert count(model.disc_eo) == count(model.disc_sar) == patchgan


def test_translate_is_inference():
    model = NPDEModel(NPDEConfig.tiny()).train()
    sar = torch.rand(1, 3, 32, 32) * 2 - 1
    eo = translate(model.generator, sar)
    assert model.generator.training and not eo.requires_grad
    torch.testing.assert_close(eo, model.generator(sar).image, rtol=0, atol=0)
    torch.testing.assert_close(model.translate(sar), eo, rtol=0, atol=0)
