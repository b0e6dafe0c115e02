"""The model kinds cdiff trains and translates, one row each: adding a kind is one entry here.

    kind        [model] section (run config)        training task   its runs (stages)   cdiff translate
    cdiffset    cdiff.train.cdiffset.CDiffSETConfig  CDiffSETTask    cdiffset.stage_runs  translators.open_cdiffset
    s2o_npde    cdiff.train.s2o_npde.S2ONPDEConfig   S2ONPDETask     one                  translators.open_s2o_npde
    distill     cdiff.train.distill.DistillConfig    DistillTask     one                  translators.open_cdiffset (a
                                                                                         student is a C-DiffSET file
                                                                                         that records its sampler
                                                                                         and steps)

``model.kind`` of a run config picks the row for ``cdiff train`` (cdiff.train.configfile,
cdiff.train.run). ``cdiff translate`` picks it from the model file: the row whose ``recognises``
accepts the file, else C-DiffSET's (``recognises`` None), which reads anything
cdiff.load_pipeline reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cdiff.npde.files import is_model_file as is_npde_model_file
from cdiff.train.cdiffset import CDiffSETConfig, CDiffSETTask, stage_runs
from cdiff.train.distill import DistillConfig, DistillTask, is_student_file
from cdiff.train.s2o_npde import S2ONPDEConfig, S2ONPDETask
from cdiff.translators import open_cdiffset, open_s2o_npde


@dataclass(frozen=True)
class ModelKind:
    name: str
    config: type  # the dataclass of a run config's [model] section
    task: type  # trains it: task(run config, device, checkpoint folder or None) (cdiff.train.task.Task)
    open_translator: Callable  # (model file, Sampling, conf_dir, device, dtype, prompt, ...) -> a Translator
    #                            (cdiff.translators)
    recognises: Callable[[Path], bool] | None  # whether a model file is of this kind; None: the default kind
    stages: Callable | None = None  # (run config, run dir) -> [(folder, config)]: the runs that train a config in
    #                                 order, each in its folder of the run dir ("" = the run dir itself); None: one


KINDS = {
    kind.name: kind
    for kind in (
        ModelKind("cdiffset", CDiffSETConfig, CDiffSETTask, open_cdiffset, None, stage_runs),
        ModelKind("s2o_npde", S2ONPDEConfig, S2ONPDETask, open_s2o_npde, is_npde_model_file),
        ModelKind("distill", DistillConfig, DistillTask, open_cdiffset, is_student_file),
    )
}
DEFAULT_KIND = "cdiffset"  # a run config without model.kind; a model file no other kind recognises


def model_kind(name: str) -> ModelKind:
    """The row of ``model.kind`` ``name``; another name is an error listing the kinds."""
    if name not in KINDS:
        raise ValueError(f"config: model.kind must be one of {sorted(KINDS)}, got {name!r}")
    return KINDS[name]


def kind_of_file(path: Path) -> ModelKind:
    """The kind of the model file ``path``: the row that recognises it, else the default kind."""
    found = [kind for kind in KINDS.values() if kind.recognises is not None and kind.recognises(path)]
    return found[0] if found else KINDS[DEFAULT_KIND]
