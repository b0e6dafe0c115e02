"""The PMD head phi (Eq. 7) on images whose derivatives are known in closed form.

phi(u) = 1/2 u_bb |grad u|^2 / (|grad u|^2 + eps / 2), with u_bb the second derivative along
the level line (t^T Hess(u) t, t the unit tangent): zero on straight edges, the curvature
term on curved ones. Expected values below come from the analytic derivatives.
"""

import math

import pytest
import torch

from cdiff.npde import PMDHead

EPS = 1e-4
INNER = (..., slice(2, -2), slice(2, -2))  # the mirrored border disturbs the outer 2 pixels


# Tensors here are tiny: thread hand-offs cost more than they save, badly on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) pixel coordinates, fp64, (H, W) each."""
    return torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")


def phi_exact(u_x, u_y, u_xx, u_yy, u_xy):
    return (u_x**2 * u_yy - 2 * u_x * u_y * u_xy + u_y**2 * u_xx) / (2 * (u_x**2 + u_y**2) + EPS)


def run_head(u: torch.Tensor) -> torch.Tensor:
    """(H, W) fp64 -> phi (H, W) fp64 through the head (fp32 inside)."""
    return PMDHead(EPS)(u[None, None].float())[0, 0].double()


def test_head_is_fixed_and_per_channel():
    head = PMDHead(EPS)
    assert list(head.parameters()) == []
    assert "stencils" in dict(head.named_buffers()) and head.state_dict() == {}
    u = torch.randn(2, 3, 16, 20)
    out = head(u)
    assert out.shape == u.shape
    # each channel alone gives the same answer: no mixing across channels
    torch.testing.assert_close(out[:, 1:2], head(u[:, 1:2]), rtol=0, atol=0)
    assert head(u.double()).dtype == torch.float64
    # the bound the tanh prediction layer relies on: |phi| <= 1 for images in [-1, 1]
    extreme = torch.randint(0, 2, (4, 3, 32, 32)).float() * 2 - 1
    assert head(extreme).abs().max() <= 1
    with pytest.raises(ValueError, match="> 2"):
        head(torch.zeros(1, 1, 2, 8))


def test_ramp_has_zero_second_derivatives_and_zero_residual():
    y, x = grid(24, 32)
    u = 0.03 * x - 0.02 * y - 0.4  # values in [-1, 1]
    d = PMDHead(EPS).derivatives(u[None, None].float())
    torch.testing.assert_close(d["u_x"][0, 0][INNER], torch.full((20, 28), 0.03), rtol=0, atol=1e-6)
    torch.testing.assert_close(d["u_y"][0, 0][INNER], torch.full((20, 28), -0.02), rtol=0, atol=1e-6)
    for name in ("u_xx", "u_yy", "u_xy"):
        assert d[name][0, 0][INNER].abs().max() < 1e-6, name
    assert run_head(u)[INNER].abs().max() < 1e-6


def test_stencils_are_exact_on_quadratics():
    # Central differences are exact on quadratics, so every derivative is known exactly.
    y, x = grid(20, 24)
    x, y = x - 11.5, y - 9.5  # pixel units, centred
    a, b, c, e = 0.003, -0.005, 0.002, 0.01
    u = a * x**2 + b * x * y + c * y**2 + e * x
    d = PMDHead(EPS).derivatives(u[None, None].float())
    expected = {"u_x": 2 * a * x + b * y + e, "u_y": b * x + 2 * c * y, "u_xx": torch.full_like(x, 2 * a),
                "u_yy": torch.full_like(x, 2 * c), "u_xy": torch.full_like(x, b)}
    for name, value in expected.items():
        torch.testing.assert_close(d[name][0, 0][INNER].double(), value[INNER], rtol=0, atol=1e-6, msg=name)


def test_matches_the_analytic_edge_direction_term_of_a_smooth_image():
    # u = sin(a x) cos(b y): every derivative in closed form, the cross term u_xy included.
    y, x = grid(48, 64)
    a, b = 0.1, 0.07
    u = torch.sin(a * x) * torch.cos(b * y)
    expected = phi_exact(
        u_x=a * torch.cos(a * x) * torch.cos(b * y), u_y=-b * torch.sin(a * x) * torch.sin(b * y),
        u_xx=-a * a * u, u_yy=-b * b * u, u_xy=-a * b * torch.cos(a * x) * torch.sin(b * y),
    )
    err = (run_head(u) - expected)[INNER].abs().max() / expected[INNER].abs().max()
    assert err < 0.01, f"relative error {err:.2e}"  # the stencils are O(h^2): measured 3.5e-3


def test_straight_edges_give_zero_and_curved_edges_give_their_curvature():
    y, x = grid(64, 64)
    cy = cx = 31.5
    width = 3.0  # the edge profile is tanh(distance / width)

    # Straight edges, any orientation: no diffusion at all, although the second derivative
    # across the edge (what isotropic diffusion would use) is large.
    straight = []
    for degrees in (0, 10, 30, 45, 90):
        t = math.radians(degrees)
        u = torch.tanh((math.cos(t) * (x - cx) + math.sin(t) * (y - cy)) / width)
        across = PMDHead(EPS).derivatives(u[None, None].float())
        laplacian = (across["u_xx"] + across["u_yy"])[0, 0][INNER].abs().max().item()
        residual = run_head(u)[INNER].abs().max().item()
        if degrees % 90 == 0:
            assert residual == 0.0, degrees  # u_y = u_yy = 0 (or u_x = u_xx = 0) exactly
        if degrees == 45:
            assert residual < 1e-7  # the stencils are symmetric about the diagonal: zero up to rounding
        assert residual < 0.01 * laplacian / 2, (degrees, residual, laplacian)  # measured <= 0.4 %
        straight.append(residual)

    # A circular edge of radius R: u = f(r), u_bb = f'(r) / r, the curvature 1 / r times |grad u|.
    radius = 14.0
    r = ((x - cx) ** 2 + (y - cy) ** 2).sqrt()
    u = torch.tanh((r - radius) / width)
    f_r = (1 - u**2) / width
    expected = 0.5 * (f_r / r) * 2 * f_r**2 / (2 * f_r**2 + EPS)
    got = run_head(u)
    band = (r - radius).abs() < 2 * width  # where the edge is
    err = (got - expected)[band].abs().max() / expected[band].abs().max()
    assert err < 0.1, f"relative error {err:.2e}"
    assert got[band].abs().max() > 20 * max(straight)


def edge_column(u: torch.Tensor) -> torch.Tensor:
    """(H, W) image of an edge going from -1 (left) to +1 (right) -> (H,) its x per row."""
    i = (u > 0).double().argmax(dim=1)  # first pixel right of the edge, per row
    rows = torch.arange(u.shape[0])
    left, right = u[rows, i - 1].double(), u[rows, i].double()
    return i - 1 + left / (left - right)


def test_one_step_per_iteration_smooths_along_the_edge_not_across_it():
    # Iterating u <- u + phi(u) (Eq. 7, dt = 1) on a wavy edge straightens it as fast as
    # heat diffusion with the same weight would, but keeps the edge sharp; heat blurs it.
    head = PMDHead(EPS)
    y, x = grid(64, 48)
    amplitude, period, width = 3.0, 32.0, 2.0
    wavy = torch.tanh((x - 23.5 - amplitude * torch.sin(2 * math.pi * y / period)) / width)[None, None].float()
    straight = torch.tanh((x - 23.5) / width)[None, None].float()

    def sharpness(u):  # mean over rows of the steepest gradient along the row
        d = head.derivatives(u)
        return (d["u_x"] ** 2 + d["u_y"] ** 2).sqrt()[0, 0].amax(dim=1).mean().item()

    along, heat, flat = wavy.clone(), wavy.clone(), straight.clone()
    for _ in range(100):
        along = along + head(along)
        d = head.derivatives(heat)
        heat = heat + (d["u_xx"] + d["u_yy"]) / 2
        flat = flat + head(flat)

    def wiggle(u):
        column = edge_column(u[0, 0])
        return (column.max() - column.min()).item() / 2

    assert wiggle(wavy) == pytest.approx(amplitude, abs=0.05)
    assert wiggle(along) < 0.6 * amplitude  # measured 1.61 of 3
    assert wiggle(along) == pytest.approx(wiggle(heat), rel=0.05)  # the same smoothing along the edge
    assert sharpness(along) > 0.85 * sharpness(wavy)  # measured 0.91
    assert sharpness(heat) < 0.2 * sharpness(wavy)  # measured 0.16
    torch.testing.assert_close(flat, straight, rtol=0, atol=0)  # a straight edge does not move

