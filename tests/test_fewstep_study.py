"""The machinery of studies/fewstep on tiny random models and two scenes (not the real run): the blur check
against a direct computation, the AUROC against torchmetrics, the teacher's-map row, passes, the plot."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cdiff.testing import randomize_, tiny_pipeline
from studies.fewstep.arms import Arm, arm_pipeline, translate_arm, unet_passes
from studies.fewstep.measures import confidence_auroc, high_frequency_energy, hf_ratio
from studies.fewstep.plot import draw_quality
from studies.fewstep.report import FewStepProtocol, heldout, measure, outer_fraction, targets

pytestmark = pytest.mark.usefixtures("one_thread")


def test_high_frequency_energy_is_the_spectrum_above_the_cutoff():
    """A cosine of 1/4 cycle per pixel (above 1/16) keeps its energy, one of 1/32 (below) has none; the
    energy of a cosine of amplitude A on N x N pixels is (A N^2 / 2)^2 x 2 (its two spectral peaks)."""
    n, x = 32, torch.arange(32, dtype=torch.float64)
    fast = (0.3 * torch.cos(2 * torch.pi * x / 4))[None, None, None, :].expand(1, 1, n, n)
    slow = (0.3 * torch.cos(2 * torch.pi * x / 32))[None, None, None, :].expand(1, 1, n, n)
    assert high_frequency_energy(fast).item() == pytest.approx(2 * (0.3 * n * n / 2) ** 2, rel=1e-9)
    assert high_frequency_energy(slow).item() == pytest.approx(0, abs=1e-12)
    # hf_ratio of a blurred image: below 1; of the image itself: 1.
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blurred = F.avg_pool2d(image, 5, 1, 2, count_include_pad=False)
    assert hf_ratio(image, image) == pytest.approx(1) and hf_ratio(blurred, image) < 0.5


def test_confidence_auroc_scores_the_variance_against_touched_cells():
    from torchmetrics.functional.classification import binary_auroc

    gen = torch.Generator().manual_seed(1)
    confidence = torch.rand(2, 1, 4, 4, generator=gen) + 0.1
    mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    mask[0, 3:5, 9:11] = mask[1, 20:30, 0:2] = True
    touched = F.max_pool2d(mask.float()[:, None], 8)[:, 0] > 0
    expected = float(binary_auroc((1 / confidence[:, 0]).flatten().double(), touched.flatten().long()))
    assert confidence_auroc(confidence, mask) == pytest.approx(expected, abs=1e-6)  # torchmetrics in fp32


def test_the_study_runs_end_to_end(tmp_path):
    teacher, student = tiny_pipeline(0), tiny_pipeline(0)
    randomize_(teacher.unet, 1)
    randomize_(student.unet, 2)
    student.sampling = ("lcm", 2)
    protocol = FewStepProtocol(scenes=2, chunk=2, timed_scenes=1)
    arms = [Arm("teacher DDIM-4", "DDIM", "teacher", "ddim", 4),
            Arm("teacher DDIM-4, cache interval 2", "DDIM-50 + DeepCache", "teacher", "ddim", 4, 2),
            Arm("student lcm-2", "student", "student", "lcm", 2),
            Arm("student lcm-2, teacher's map", "student, teacher's map", "student", "lcm", 2, teacher_confidence=True)]
    data = heldout(protocol)
    rows = measure(teacher, student, arms, data, protocol, progress=lambda line: None)
    assert [r["name"] for r in rows] == [a.name for a in arms] and rows[0]["psnr_vs_ddim50"] == 99.0
    assert rows[0]["speedup"] == 1.0 and all(r["seconds"] > 0 for r in rows)
    fraction = outer_fraction(teacher, 128)
    assert 0.2 < fraction < 0.8
    assert rows[1]["passes"] == pytest.approx(2 + 2 * fraction)  # steps 0 and 2 (also the confidence step, t = 251)
    assert rows[3]["passes"] == 3 and unet_passes(arms[2], fraction, teacher.process) == 2
    # The teacher's-map row: the student's images, the teacher's variance at the student's step t = 499.
    assert rows[3]["psnr"] == rows[2]["psnr"] and rows[3]["auroc"] != rows[2]["auroc"]
    mapped = translate_arm(arm_pipeline(arms[3], teacher, student), arms[3], data["sar"], data["noise"], 1)
    seen = {}

    def keep(module, args) -> None:
        seen[int(args[1])] = args[0]

    teacher.unet.register_forward_pre_hook(keep)
    translate_arm(arm_pipeline(arms[3], teacher, student), arms[3], data["sar"], data["noise"], 1)
    assert list(seen) == [499]  # one teacher pass, at the student's step with t <= T/2
    with torch.no_grad():
        raw = teacher.unet(seen[499], torch.tensor(499), teacher.context.expand(2, -1, -1))[:, 4:]
    from cdiff.loss import confidence_from_raw

    torch.testing.assert_close(mapped.confidence, confidence_from_raw(raw), rtol=0, atol=0)
    checks = targets([dict(r, family="DDIM" if i == 0 else r["family"]) for i, r in enumerate(rows)])
    assert [c["what"].split(":")[0] for c in checks] == ["DeepCache at 50 steps"]
    draw_quality(tmp_path / "plot.png", [dict(r, arm=dict(r["arm"], steps=50) if i == 0 else r["arm"])
                                         for i, r in enumerate(rows)], "test")
    assert np.asarray(Image.open(tmp_path / "plot.png")).shape[2] == 3
