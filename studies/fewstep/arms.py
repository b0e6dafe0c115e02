"""The rows of the few-step study: which model, sampler, step count, cache interval and confidence map each runs.

Every row translates the same held-out scenes from the same starting noise (scene i: noise of seed i);
a sampler that draws fresh noise (LCM) draws it from one seeded generator per chunk of scenes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cdiff.pipeline import Pipeline, Translation, confidence_step
from cdiff.stepcache import whole_steps


@dataclass(frozen=True)
class Arm:
    """One row: ``model`` "teacher" or "student" (or "teacher" sampled as the student is, a control)."""

    name: str
    family: str  # the plot's series: "DDIM", "DPM-Solver++(2M)", "DDIM-50 + DeepCache", "student", "control"
    model: str  # "teacher" or "student"
    sampler: str
    steps: int
    cache_interval: int = 1
    teacher_confidence: bool = False  # the map from one teacher pass at the confidence step (the student's own else)


class TeacherConfidence(nn.Module):
    """A student U-Net whose variance channel, at timestep ``t_map``, comes from one pass of the teacher on the
    same input: the other way a few-step student can keep its confidence map (one teacher pass at t <= T/2)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, t_map: int):
        super().__init__()
        self.student, self.teacher, self.t_map = student, teacher, t_map
        self.config = student.config

    def forward(self, sample, t, context):
        out = self.student(sample, t, context)  # (B, 5, h, w)
        if int(t) != self.t_map:
            return out
        channels = out.shape[1] - 1
        return torch.cat([out[:, :channels], self.teacher(sample, t, context)[:, channels:]], dim=1)


def arm_pipeline(arm: Arm, teacher: Pipeline, student: Pipeline | None) -> Pipeline:
    """The pipeline that runs ``arm``."""
    if arm.model == "teacher":
        return teacher
    if not arm.teacher_confidence:
        return student
    from cdiff.samplers import make_sampler

    timesteps = make_sampler(arm.sampler, student.process, arm.steps).timesteps
    t_map = timesteps[confidence_step(timesteps, student.process.num_train_timesteps)]
    return Pipeline(TeacherConfidence(student.unet, teacher.unet, t_map), student.vae, student.context,
                    prompt=student.prompt, process=student.process, prediction_type=student.prediction_type,
                    sampling=student.sampling)


def unet_passes(arm: Arm, outer_fraction: float, process) -> float:
    """U-Net passes of one translation in whole-pass units: an outer-level pass (DeepCache) counts
    ``outer_fraction`` of a whole one (its share of the FLOPs); a teacher confidence pass counts one."""
    if arm.cache_interval == 1:
        return arm.steps + arm.teacher_confidence
    from cdiff.samplers import make_sampler

    timesteps = make_sampler(arm.sampler, process, arm.steps).timesteps
    whole = sum(whole_steps(arm.steps, arm.cache_interval, (confidence_step(timesteps, process.num_train_timesteps),)))
    return whole + (arm.steps - whole) * outer_fraction


@torch.no_grad()
def translate_arm(pipeline: Pipeline, arm: Arm, sar: torch.Tensor, noise: torch.Tensor, fresh_seed: int) -> Translation:
    """``arm`` on SAR (B, 3, H, W) from starting noise (B, 4, h, w)."""
    return pipeline.translate(sar, steps=arm.steps, sampler=arm.sampler, latents=noise,
                              generator=torch.Generator().manual_seed(fresh_seed), cache_interval=arm.cache_interval)


def standard_arms(student_steps: tuple[int, ...] = (1, 2, 4), student_sampler: str = "lcm") -> list[Arm]:
    """The study's rows: the teacher's DDIM-50 (the reference, first), DDIM and DPM-Solver++(2M) at fewer
    steps, DDIM-50 with DeepCache, the teacher sampled as the student is (no distillation: the control),
    and the student at each of its step counts, the 4-step one also with the teacher's map."""
    arms = [Arm("teacher DDIM-50", "DDIM", "teacher", "ddim", 50)]
    arms += [Arm(f"teacher DDIM-{n}", "DDIM", "teacher", "ddim", n) for n in (1, 2, 4, 8, 20)]
    arms += [Arm(f"teacher DPM-Solver++(2M)-{n}", "DPM-Solver++(2M)", "teacher", "dpmpp_2m", n) for n in (4, 8, 20)]
    arms += [Arm(f"teacher DDIM-50, cache interval {k}", "DDIM-50 + DeepCache", "teacher", "ddim", 50, k)
             for k in (2, 3, 5, 10)]
    arms += [Arm(f"teacher {student_sampler}-4 (not distilled)", "control", "teacher", student_sampler, 4)]
    arms += [Arm(f"student {student_sampler}-{n}", "student", "student", student_sampler, n) for n in student_steps]
    arms += [Arm(f"student {student_sampler}-4, teacher's map", "student, teacher's map", "student", student_sampler, 4,
                 teacher_confidence=True)]
    return arms
