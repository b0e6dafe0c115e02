"""The PMD head phi of S2O-NPDE (section 3.3, Eq. 7): fixed finite-difference convolutions.

Perona-Malik diffusion with the shape constant set to k^2 = |grad u|^2 drops the diffusion
across edges (along the gradient, alpha) and keeps half of it along edges (the isophote
direction, beta). One explicit step with dt = 1 then moves u by

    phi(u) = 1/2 u_bb = (u_x^2 u_yy - 2 u_x u_y u_xy + u_y^2 u_xx) / (2 (u_x^2 + u_y^2) + eps)

u_bb is the second derivative along the unit tangent t = (-u_y, u_x) / |grad u|, i.e.
t^T Hess(u) t = curvature of the level line x |grad u|. So phi is exactly 0 on a straight
edge whatever its profile, and it bends curved level lines towards straight ones: it
smooths along edges, never across them. eps (not in the paper) makes flat ground, where
the direction is undefined, give 0 instead of 0/0.

Stencils: the paper's kernels are compositions of the central difference with itself
(its W_yy is [1, 0, -2, 0, 1] and its W_xy is [1, 0, -1; 0; -1, 0, 1]). cdiff uses the same
stencils, divided by their grid factor so that each is the derivative per pixel:

    u_x  = (u[x+1] - u[x-1]) / 2               u_xx = (u[x+2] - 2 u[x] + u[x-2]) / 4
    u_xy = (u[x+1,y+1] - u[x+1,y-1] - u[x-1,y+1] + u[x-1,y-1]) / 4

(x along the width, y along the height.) With these, |phi| <= 1 for images in [-1, 1], the
range of the tanh layer that predicts it: each second derivative is at most 1 in size, so
|t^T H t| <= max(|u_xx|, |u_yy|) + |u_xy| <= 2 for a unit t, and Eq. 7 halves it.

The paper's undivided stencils make its first derivatives 2x and its second derivatives 4x
these, so its phi is PAPER_PHI_SCALE = 4 times this head's (16x in the numerator of Eq. 7, 4x
in its denominator). The PDE loss (cdiff.npde.losses) multiplies its L1 terms by that factor,
so that Eq. 8's weight 10 weighs the paper's phi, not a quarter of it.
The image is extended by mirroring ("reflect", a zero-flux Neumann boundary, the usual
boundary of Perona-Malik diffusion); a ramp is therefore exact except in the outer 2 pixels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DERIVATIVES = ("u_x", "u_y", "u_xx", "u_yy", "u_xy")
PAPER_PHI_SCALE = 4.0  # the paper's phi (undivided stencils) over this head's (per-pixel derivatives)
STENCIL_RADIUS = 2  # the second-derivative stencils reach two pixels


def _stencils() -> torch.Tensor:
    """(5, 1, 5, 5) cross-correlation kernels, in the order of DERIVATIVES."""
    k = torch.zeros(5, 5, 5, dtype=torch.float64)
    c = STENCIL_RADIUS  # centre index; k[i, c + dy, c + dx] weighs u[y + dy, x + dx]
    k[0, c, c - 1], k[0, c, c + 1] = -0.5, 0.5  # u_x
    k[1, c - 1, c], k[1, c + 1, c] = -0.5, 0.5  # u_y
    k[2, c, c - 2], k[2, c, c], k[2, c, c + 2] = 0.25, -0.5, 0.25  # u_xx
    k[3, c - 2, c], k[3, c, c], k[3, c + 2, c] = 0.25, -0.5, 0.25  # u_yy
    k[4, c + 1, c + 1], k[4, c - 1, c - 1], k[4, c + 1, c - 1], k[4, c - 1, c + 1] = 0.25, 0.25, -0.25, -0.25  # u_xy
    return k[:, None].float()


class PMDHead(nn.Module):
    """phi(u) of Eq. 7, per channel. Input (B, C, H, W), H and W > 2; output the same shape.

    No parameters: the stencils are a non-persistent buffer (they follow ``.to()`` but are
    not written into checkpoints). Computed in fp32 whatever the input dtype; the result
    has the input's dtype.
    """

    def __init__(self, eps: float = 1e-4):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"PMDHead: eps must be > 0, got {eps}")
        self.eps = eps
        self.register_buffer("stencils", _stencils(), persistent=False)

    def derivatives(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """The five finite differences of ``u`` (B, C, H, W), fp32, keyed by DERIVATIVES."""
        if u.ndim != 4:
            raise ValueError(f"PMDHead: expected (B, C, H, W), got shape {tuple(u.shape)}")
        b, c, h, w = u.shape
        if min(h, w) <= STENCIL_RADIUS:
            raise ValueError(f"PMDHead: image sides must be > {STENCIL_RADIUS}, got {h}x{w}")
        planes = u.float().reshape(b * c, 1, h, w)  # each channel on its own
        planes = F.pad(planes, (STENCIL_RADIUS,) * 4, mode="reflect")
        d = F.conv2d(planes, self.stencils.float()).reshape(b, c, 5, h, w)
        return {name: d[:, :, i] for i, name in enumerate(DERIVATIVES)}

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        d = self.derivatives(u)
        u_x, u_y = d["u_x"], d["u_y"]
        along_edge = u_x.square() * d["u_yy"] - 2 * u_x * u_y * d["u_xy"] + u_y.square() * d["u_xx"]
        return (along_edge / (2 * (u_x.square() + u_y.square()) + self.eps)).to(u.dtype)
