"""The ``cdiff`` command. Each subcommand's work lives in the module it names; this file
only turns arguments into one call, so ``cdiff X --help`` and the Python API stay in step."""

from __future__ import annotations

import argparse
import sys

import cdiff
from cdiff.signals import Interrupted
from cdiff.config import DTYPES


def _add_demo(sub) -> None:
    from cdiff.demo import Protocol

    p = sub.add_parser(
        "demo",
        help="translate held-out synthetic SAR scenes with the bundled tiny model and score them (CPU, seconds)",
        description="The bundled demo model (weights/cdiff-demo-tiny.safetensors: cdiff's tiny C-DiffSET stack "
        "trained from scratch on the CPU on synthetic scenes only, with a random prompt embedding, to predict the noise "
        "and a variance with the C-Diff loss; see weights/README.md) translates held-out synthetic SAR scenes, "
        "from seeds training never saw. Writes into --out the SAR, prediction, target and confidence PNGs of each "
        "scene, panel.png (one row per scene: SAR | prediction | target | confidence) and metrics.md / "
        "metrics.json, and prints the table of PSNR, SSIM and SCC with the trivial baselines beside it. "
        "With --sar FILE it translates your own image instead (a warning says why that output means little).",
    )
    p.add_argument("--out", default="cdiff-demo", help="output folder (default: %(default)s)")
    p.add_argument("--sar", metavar="FILE", help="translate this SAR image (grey PNG/JPEG/TIFF, sides multiples of 64) "
                   "instead of the synthetic scenes")
    p.add_argument("--scenes", type=int, default=4, help="held-out scenes to translate (default: %(default)s)")
    p.add_argument("--size", type=int, default=128, help="scene side in pixels, a multiple of 64 (default: %(default)s, "
                   "the training size)")
    p.add_argument("--steps", type=int, default=Protocol.steps, help="DDIM steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default: %(default)s)")
    p.add_argument("--model", metavar="FILE", help="a native model file instead of the bundled demo model")

    def run(a):
        from cdiff.demo import run_demo, run_demo_on_file

        if a.sar is not None:
            run_demo_on_file(a.sar, a.out, steps=a.steps, seed=a.seed, model=a.model)
        else:
            run_demo(a.out, scenes=a.scenes, steps=a.steps, seed=a.seed, size=a.size, model=a.model)

    p.set_defaults(run=run)


def _add_synth(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic SAR-EO dataset with known discrepancies (generic layout + masks)",
        description="Generate COUNT seeded SAR-EO pairs (pair i from seed SEED+i) and write OUT_DIR/sar/, "
        "eo/, discrepancy/, misregistration/ (PNG), pairs.csv and synth.json. The masks mark objects "
        "present in one image only and SAR patches shifted by a few pixels (see cdiff.data.synth).",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created if missing; an existing one must be empty)")
    p.add_argument("--count", type=int, default=100, help="number of pairs (default: %(default)s)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels, a multiple of 64 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first pair, >= 0 (default: %(default)s)")
    p.add_argument("--looks", type=float, default=4.0, help="looks of the SAR speckle; 0 for none (default: %(default)s)")
    p.add_argument("--discrepancies", type=int, default=3, help="objects in one image only, per pair (default: %(default)s)")
    p.add_argument("--misregistrations", type=int, default=2, help="shifted SAR patches per pair (default: %(default)s)")
    _add_overwrite(p, "replace a non-empty OUT_DIR: everything in it is deleted once the new dataset is complete")

    def run(a):
        from cdiff.data.synth import write_synthetic

        out = write_synthetic(
            a.out_dir, a.count, size=a.size, seed=a.seed, looks=a.looks or None,
            discrepancies=a.discrepancies, misregistrations=a.misregistrations, overwrite=a.overwrite,
        )
        print(f"cdiff synth: {a.count} pairs of {a.size}x{a.size} (seeds {a.seed}..{a.seed + a.count - 1}) -> {out}: "
              "sar/, eo/, discrepancy/, misregistration/, pairs.csv, synth.json")

    p.set_defaults(run=run)


def _add_convert(sub) -> None:
    from cdiff.pipeline import DEFAULT_PROMPT

    p = sub.add_parser(
        "convert",
        help="make a cdiff C-DiffSET model from an SD 2.1 checkpoint (or a release U-Net)",
        description="Read SRC (Stability's single .safetensors/.ckpt, a diffusers model folder, or a "
        "cdiff file), apply the C-DiffSET surgery (conv_in 4->8 [SAR | EO] x 0.5, conv_out 4->5 with a "
        "zero variance channel), encode the fixed prompt once with SRC's text encoder, and write one "
        "native .safetensors. With --unet, the U-Net comes from an official C-DiffSET release file and "
        "the VAE and text encoder from SRC. Nothing is written unless everything succeeds.",
    )
    p.add_argument("src", metavar="SRC", help="SD 2.1 checkpoint file or diffusers folder (or a cdiff native file)")
    p.add_argument("out", metavar="OUT", help="the native .safetensors file to write")
    p.add_argument("--unet", metavar="RELEASE_FILE", help="U-Net from the C-DiffSET release (model.safetensors), 8-in/4-out or 8-in/5-out")
    p.add_argument("--plain", action="store_true", help="write the plain SD 2.1 model: no surgery")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the fixed prompt (default: %(default)r)")
    p.add_argument("--pad-to-77", action="store_true", help="pad the prompt to 77 tokens (SD's convention; the release does not)")
    p.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep the stored dtype)")
    _add_overwrite(p, "replace an existing OUT (never SRC itself)")

    def run(a):
        from cdiff.convert import convert

        convert(a.src, a.out, unet=a.unet, plain=a.plain, prompt=a.prompt, pad_to_77=a.pad_to_77, dtype=a.dtype,
                overwrite=a.overwrite)

    p.set_defaults(run=run)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a cdiff model in another layout (diffusers folder, original single file, release U-Net)",
        description="Write SRC (normally a cdiff native file) as a diffusers folder (unet/, vae/, "
        "scheduler/, model_index.json; the prompt embedding in cdiff_context.safetensors), as one file "
        "in Stability's original layout, or as the C-DiffSET release's U-Net file.",
    )
    p.add_argument("src", metavar="SRC", help="the model to export (any layout cdiff reads)")
    p.add_argument("out", metavar="OUT", help="the folder (diffusers) or .safetensors file to write")
    p.add_argument("--to", required=True, choices=("diffusers", "original", "release"), help="the layout to write")
    _add_overwrite(p, "replace an existing OUT file, or a non-empty OUT folder (never SRC itself)")

    def run(a):
        from cdiff.export import export

        export(a.src, a.out, to=a.to, overwrite=a.overwrite)

    p.set_defaults(run=run)


STAGE_CHOICES = {"1": "[1]", "2": "[2]", "both": "[1, 2]"}  # cdiff train --stage -> model.stages


def _train_config(a, resume_dir=None):
    """The run config of ``cdiff train`` / ``cache-latents`` arguments: --config (or the run's own
    config.toml) with the shorthand flags and every --set applied; None to resume unchanged."""
    from cdiff.train.configfile import load_config

    sets = list(a.set or [])
    flags = (("prediction", "model.prediction"), ("loss", "model.loss"), ("skip_nonfinite", "train.skip_nonfinite"),
             ("teacher", "model.teacher"), ("method", "model.method"), ("student_steps", "model.steps"))
    for flag, key in flags:
        if getattr(a, flag, None) is not None:
            sets.append(f"{key}={getattr(a, flag)}")
    if getattr(a, "stage", None) is not None:
        sets.append(f"model.stages={STAGE_CHOICES[a.stage]}")
    if resume_dir is not None and a.config is None:
        if not sets:
            return None
        from pathlib import Path

        return load_config(Path(resume_dir) / "config.toml", sets)
    return load_config(a.config, sets)


def _add_set_option(p) -> None:
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set optim.lr=1e-5 --set data.root=/data/qxs (repeatable)")


def _add_train(sub) -> None:
    from cdiff.schedulers import PREDICTION_TYPES
    from cdiff.train.cdiffset import LOSSES
    from cdiff.train.kinds import DEFAULT_KIND, KINDS

    p = sub.add_parser(
        "train",
        help="fine-tune a C-DiffSET model, or train the S2O-NPDE baseline, on paired SAR-EO data (resumable)",
        description="Fine-tune the U-Net with the C-Diff loss as the official release does, from any model "
        "cdiff.load_pipeline reads (a native file from 'cdiff convert', or a release U-Net with --set "
        "model.unet=FILE). The dataset configs (configs/qxs-saropt.toml, sar2opt.toml, sar2eo.toml, "
        "spacenet6.toml) train the release's two stages in order with the field's settings: stage 1 (SD 2.1, "
        "conv_in widened to 8 channels, 4 outputs, MSE) in RUN_DIR/stage1, then stage 2 (+ the variance "
        "channel, the C-Diff loss) in RUN_DIR/stage2 (docs/training.md). "
        "The run directory receives config.toml, log.jsonl, validation grids in val/ and "
        "checkpoints in checkpoints/step-N/ (model.safetensors is a native model file; 'latest' and 'best' "
        "link to them). Configs: configs/*.toml; every key can be overridden with --set. Several GPUs: "
        "torchrun --nproc-per-node N -m cdiff train ... (the global batch is train.batch_size x N x "
        "train.accumulation). With model.kind = \"s2o_npde\" (configs/s2o_npde_sen12.toml) it trains the "
        "S2O-NPDE GAN from scratch instead, with the paper's Adam and schedule, in one process; "
        "model.tcd / model.pmd / model.pde_loss switch its components off (the paper's Table 2). "
        "Ctrl-C or SIGTERM stops at the end of the step in flight with a checkpoint of it (a second one stops at "
        "once); continue with --resume. One process trains in a run directory at a time (it holds RUN_DIR/.lock). "
        f"model.kind is one of {', '.join(KINDS)} (default {DEFAULT_KIND}).",
    )
    p.add_argument("--config", metavar="TOML", help="the run config (e.g. configs/qxs-saropt.toml); with --resume, "
                   "replaces the run's own")
    p.add_argument("--run-dir", metavar="DIR", help="a new folder for the run's outputs")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint, exactly")
    p.add_argument("--force", action="store_true",
                   help="with --resume: accept a config that differs from the run's; with either: take over the "
                   "run directory's lock from a process that is no longer running (killed, or on another machine)")
    _add_set_option(p)
    p.add_argument("--prediction", choices=PREDICTION_TYPES, help="what the U-Net predicts: the noise (the paper's), "
                   "the clean EO latent, or v (sets model.prediction)")
    p.add_argument("--loss", choices=LOSSES, help="stage 2's loss: the C-Diff loss, or plain L2 (sets model.loss)")
    p.add_argument("--stage", choices=tuple(STAGE_CHOICES), help="train stage 1 (SD 2.1 -> 8-in/4-out, MSE), stage 2 "
                   "(+ variance channel, C-Diff loss, from model.init: e.g. a released sd21ft-<dataset>) or both in "
                   "order (sets model.stages)")
    p.add_argument("--skip-nonfinite", type=int, metavar="N", help="skip up to N steps with a NaN/Inf loss (sets train.skip_nonfinite)")
    p.add_argument("--stop-at", type=int, metavar="STEP", help="stop after STEP with a checkpoint (continue later with --resume); in a run of two "
                   "stages, after STEP of the stage in progress, without starting the next")

    def run(a):
        from cdiff.torchrun import launch
        from cdiff.train import train

        if (a.run_dir is None) == (a.resume is None):
            raise ValueError("cdiff train: give either --run-dir DIR (a new run, with --config) or --resume RUN_DIR")
        config = _train_config(a, a.resume)
        done = train(config, a.resume or a.run_dir, resume=a.resume is not None, force=a.force, stop_at=a.stop_at)
        if launch().is_main:  # under torchrun, one line for the run
            print(f"cdiff train: step {done.step}; newest checkpoint {done.checkpoint}")

    p.set_defaults(run=run)


def _add_distill(sub) -> None:
    from cdiff.train.distill import METHODS

    p = sub.add_parser(
        "distill",
        help="distil a trained C-DiffSET model into a student that translates in 1, 2 or 4 steps (resumable)",
        description="Train a few-step student from a trained C-DiffSET teacher (--teacher: a native model file, "
        "e.g. a 'cdiff train' checkpoint's model.safetensors), with the trainer: the run directory, --resume, "
        "torchrun, log.jsonl and validation grids work as for 'cdiff train'. The student starts as a copy of the "
        "teacher's U-Net; consistency distillation (LCM, the default) teaches it to jump to the clean image from "
        "any step, progressive distillation to do two of its teacher's DDIM steps in one. Its variance channel "
        "learns the teacher's, so it keeps a confidence map. Each checkpoint's model.safetensors is the student, "
        "a native file that records its sampler and step count: 'cdiff translate --model RUN_DIR' samples it so. "
        "Configs per dataset: configs/distill-*.toml (their comments estimate the GPU-hours at SD 2.1 size); "
        "configs/distill-synthetic-tiny.toml distils the demo model on the CPU. See docs/distill.md.",
    )
    p.add_argument("--teacher", metavar="MODEL", help="the trained C-DiffSET model to distil (sets model.teacher)")
    p.add_argument("--config", metavar="TOML", help="the run config (e.g. configs/distill-qxs.toml: the teacher's "
                   "dataset); with --resume, replaces the run's own")
    p.add_argument("--run-dir", metavar="DIR", help="a new folder for the run's outputs")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint, exactly")
    p.add_argument("--method", choices=tuple(METHODS), help="consistency (LCM) or progressive distillation "
                   "(sets model.method)")
    p.add_argument("--steps", dest="student_steps", type=int, metavar="N",
                   help="the student's sampler steps, recorded in its file: 1, 2 or 4 (sets model.steps)")
    p.add_argument("--force", action="store_true", help="as for 'cdiff train'")
    _add_set_option(p)
    p.add_argument("--stop-at", type=int, metavar="STEP", help="stop after STEP with a checkpoint (continue later with --resume)")

    def run(a):
        from cdiff.torchrun import launch
        from cdiff.train import train

        if (a.run_dir is None) == (a.resume is None):
            raise ValueError("cdiff distill: give either --run-dir DIR (a new run, with --teacher and --config) or "
                             "--resume RUN_DIR")
        if a.resume is None and (a.teacher is None or a.config is None):
            raise ValueError("cdiff distill: a new run needs --teacher MODEL and --config TOML "
                             "(configs/distill-*.toml)")
        config = _train_config(a, a.resume)
        if config is not None and config.model.kind != "distill":
            raise ValueError(f"cdiff distill: {a.config} is a run config of model.kind {config.model.kind!r}; "
                             "give a distillation config (configs/distill-*.toml, model.kind = \"distill\")")
        done = train(config, a.resume or a.run_dir, resume=a.resume is not None, force=a.force, stop_at=a.stop_at)
        if launch().is_main:
            print(f"cdiff distill: step {done.step}; newest checkpoint {done.checkpoint} (the student: "
                  f"{done.checkpoint / 'model.safetensors' if done.checkpoint else '-'})")

    p.set_defaults(run=run)


def _add_cache_latents(sub) -> None:
    p = sub.add_parser(
        "cache-latents",
        help="encode a training set once with the frozen VAE, so 'cdiff train' reads latents instead of images",
        description="Encode the training pairs of a run config (its [data] section, at its crop's centre window) "
        "with its model's VAE into OUT_DIR: safetensors shards of scaled posterior means plus index.json. Train "
        "from it with --set data.latents=OUT_DIR. With --dihedral all 8 flips/rotations are encoded, so random "
        "flips and rotations stay exact; random crops are not kept. Prints how far a flipped latent is from "
        "the latent of the flipped image.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="a new folder for the cache")
    p.add_argument("--config", required=True, metavar="TOML", help="the run config whose data and model to use")
    _add_set_option(p)
    p.add_argument("--dihedral", action="store_true", help="also encode the 7 flips/rotations of each pair (8x the time and space)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs encoded at once (default: %(default)s)")
    _add_overwrite(p, "replace a non-empty OUT_DIR once the new cache is complete")

    def run(a):
        import json

        from cdiff.train.latents import cache_latents

        out = cache_latents(_train_config(a), a.out_dir, dihedral_views=a.dihedral, batch_size=a.batch_size,
                            overwrite=a.overwrite)
        index = json.loads((out / "index.json").read_text())
        errors = ", ".join(f"{k} {v:.1%}" for k, v in index["flip_error"].items())
        print(f"cdiff cache-latents: {index['count']} pairs x {index['views']} view(s) -> {out}")
        print(f"  transformed latent vs latent of the transformed image (relative RMS): {errors}")

    p.set_defaults(run=run)


def _add_translate(sub) -> None:
    from cdiff.samplers import SAMPLERS

    p = sub.add_parser(
        "translate",
        help="translate SAR images, folders or GeoTIFF scenes to EO images (and confidence maps)",
        description="Translate every SAR image of INPUT (a file, or a folder searched recursively) with a "
        "C-DiffSET model, keeping relative paths: OUT/<name>.png, or an RGB GeoTIFF with the source's CRS, "
        "transform and nodata for TIFF input. Any size: sides are padded to multiples of 64, and images "
        "larger than --tile go through overlapping tiles. A rerun skips finished images, so Ctrl-C or SIGTERM "
        "(which let the images in flight finish, then stop; a second one stops at once) loses nothing. Off a "
        "terminal, progress comes as a line every 30 s (CDIFF_PROGRESS_SECONDS). Under torchrun "
        "(torchrun --nproc-per-node N -m cdiff translate ...) the images are shared among the ranks. "
        "Each image's noise comes from --seed and its name, so reruns and sharded runs reproduce it. "
        "An S2O-NPDE model translates in one generator pass: no steps, no noise, no confidence map, so "
        "--steps, --eta, --sampler, --seed, --prompt and --conf-dir are refused for it.",
    )
    p.add_argument("--model", required=True, metavar="M", help="a C-DiffSET model (a cdiff native file from 'cdiff "
                   "convert'), a name fetched with 'cdiff fetch NAME --convert' (e.g. cdiffset-qxs-saropt), an S2O-NPDE "
                   "model file, or a 'cdiff train' run directory (its best checkpoint, else its newest; of a "
                   "two-stage run, stage 2's); RUN_DIR@step-N takes the checkpoint of step N (runs/qxs@step-40000: "
                   "the step the field's tables publish)")
    p.add_argument("--input", required=True, metavar="SAR", help="a SAR image file or a folder of them")
    p.add_argument("--output", required=True, metavar="OUT_DIR", help="folder for the EO images")
    p.add_argument("--conf-dir", metavar="DIR", help="also save confidence maps here: <name>.png (grey, as the "
                   "release) and <name>_colour.png")
    p.add_argument("--steps", type=int, help="sampler steps (default: the model's own: a distilled student's "
                   "recorded count, else 50, the release's)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta; 0 is deterministic (default: %(default)s)")
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="ddim (the release's), dpmpp_2m (DPM-Solver++(2M), for 10-20 steps), or a distilled "
                   "student's ddim_trailing / lcm (default: the model's own: a student's recorded sampler, else ddim; "
                   "overriding a student's warns)")
    p.add_argument("--cache-interval", type=int, default=1, metavar="N",
                   help="C-DiffSET: DeepCache, run the whole U-Net every N-th step and only its outermost level "
                   "between, reusing the deep features (about 2x faster at N = 3-5 and 50 steps; docs/distill.md) "
                   "(default: %(default)s, no caching)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each image's seed also depends on its name "
                   "(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="same-sized images per batch (default: %(default)s)")
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="the U-Net's dtype, the VAE stays fp32 (S2O-NPDE: the generator's) (default: %(default)s)")
    p.add_argument("--prompt", help="the prompt to encode (default: the one stored in the model)")
    p.add_argument("--tile", type=int, default=1024, help="tile side in pixels, a multiple of 64; larger images "
                   "are translated in overlapping tiles; 0 never tiles (default: %(default)s)")
    p.add_argument("--tile-overlap", type=int, default=256, help="overlap of neighbouring tiles in pixels, a "
                   "multiple of 8 (default: %(default)s)")
    p.add_argument("--tile-batch", type=int, default=4, help="tiles per network call (default: %(default)s)")
    p.add_argument("--channels-last", action="store_true", help="C-DiffSET: run the U-Net and the VAE in "
                   "channels-last (NHWC) memory, the fast layout of GPU tensor cores; same results")
    p.add_argument("--compile", action="store_true", help="C-DiffSET: torch.compile the U-Net (each new image size "
                   "compiles once, tens of seconds; pays off over many images); same results")
    p.add_argument("--skip-bad", action="store_true", help="log and count unreadable inputs instead of stopping; "
                   "with --target, also the images the evaluation cannot score (see 'cdiff evaluate --help')")
    _add_overwrite(p, "translate again images whose outputs exist (default: skip them)")
    p.add_argument("--target", metavar="DIR", help="true EO images of the same names: evaluate the outputs "
                   "(see 'cdiff evaluate')")
    _add_metric_options(p)

    def run(a):
        from cdiff.tiling import Tiling
        from cdiff.translate import run_translate
        from cdiff.translators import Sampling

        tiling = Tiling(a.tile, a.tile_overlap, a.tile_batch) if a.tile else None
        sampling = Sampling(a.steps, a.eta, a.seed, a.batch_size, tiling, a.sampler, a.cache_interval)
        run_translate(a.model, a.input, a.output, conf_dir=a.conf_dir, sampling=sampling, device=a.device,
                      dtype=a.dtype, prompt=a.prompt, skip_bad=a.skip_bad, overwrite=a.overwrite, target=a.target,
                      evaluation=_evaluation_options(a), channels_last=a.channels_last, compile_unet=a.compile)

    p.set_defaults(run=run)


def _evaluation_options(a):
    """The EvaluationOptions of the metric options (``_add_metric_options``), --skip-bad and --batch-size."""
    from cdiff.evaluate import EvaluationOptions

    return EvaluationOptions(
        protocol="release" if a.paper_scaling else a.protocol, metrics=a.metrics, lpips_vgg=a.lpips_vgg,
        fid_weights=a.fid_weights, dists_weights=a.dists_weights, dino=a.dino, split_list=a.split_list,
        sar_dir=a.sar, dataset=a.dataset, batch_size=getattr(a, "eval_batch_size", 16), skip_bad=a.skip_bad,
        report_dir=a.report_dir)


def _add_metric_options(p) -> None:
    """Options shared by `evaluate` and `translate --target`."""
    from cdiff.protocol import METRICS, PROTOCOLS
    from cdiff.published import BENCHMARKS

    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="field",
                   help="field: as the published comparison tables (default); release: as the C-DiffSET release "
                   "computed the paper's numbers ((x + 0.5) scaling, files matched by relative path)")
    p.add_argument("--paper-scaling", action="store_true", help="the same as --protocol release (its old name)")
    p.add_argument("--metrics", metavar="LIST", help="comma-separated metrics, each of which must then be computed "
                   f"(from {','.join(METRICS)}; default: the protocol's set, leaving out those whose weights are "
                   "missing)")
    p.add_argument("--split-list", metavar="FILE", help="the test items: a text file of names or paths, one per line, "
                   f"or a benchmark's name ({', '.join(BENCHMARKS)}) for its frozen test list shipped with cdiff "
                   "(default: every image of --target)")
    p.add_argument("--dataset", choices=tuple(BENCHMARKS), help="a published benchmark: predictions must have its "
                   "evaluation size, and its published C-DiffSET and stage-1 rows are printed beside this run's")
    p.add_argument("--sar", metavar="DIR", help="the SAR inputs, same names: adds the identity-collapse ratio "
                   "mean|gen - SAR| / mean|gen - GT| (flagged below 1)")
    p.add_argument("--lpips-vgg", metavar="FILE", help="torchvision's vgg16-397923af.pth, for LPIPS and DISTS "
                   "(default: $CDIFF_LPIPS_VGG, then where 'cdiff fetch lpips-vgg' puts it: $CDIFF_CACHE_DIR/checkpoints, "
                   "torch's hub cache)")
    p.add_argument("--fid-weights", metavar="FILE", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth, for "
                   "FID and KID (default: $CDIFF_FID_INCEPTION, then where 'cdiff fetch fid-inception' puts it)")
    p.add_argument("--dists-weights", metavar="FILE", help="DISTS's alpha/beta (the authors' weights.pt) "
                   "(default: $CDIFF_DISTS, then where 'cdiff fetch dists' puts it, then the dists-pytorch package)")
    p.add_argument("--dino", metavar="DIR", help="DINOv3-SAT ViT-L/16 in the transformers layout, for DINO "
                   "(default: $CDIFF_DINO, then where 'cdiff fetch dino-sat' puts it in the Hugging Face cache); "
                   "without it DINO is left out")
    p.add_argument("--report-dir", metavar="DIR", help="where evaluation.json and evaluation.md go "
                   "(default: the prediction folder)")


def _add_evaluate(sub) -> None:
    from cdiff.evaluate import SKIP_BAD_HELP

    p = sub.add_parser(
        "evaluate",
        help="score translated images against the ground truth as the published tables do (FID, DISTS, KID, "
        "DINO, LPIPS, SSIM, PSNR)",
        description="Match the images of PRED to the test items (every image of TARGET, or the names of "
        "--split-list) by file name without suffix (a _fake_B suffix is accepted), centre-crop the ground truth "
        "to the prediction's size, and score them under the field's protocol (GeoSET's evaluator): PSNR, SSIM, "
        "LPIPS (VGG, x * 2 - 1), DISTS and DINO per image and averaged, FID and KID on 2048-d Inception "
        "features against every test item's ground truth, and with --sar the identity-collapse ratio. Metrics "
        "whose network weights are missing are left out with one line each (get them with 'cdiff fetch NAME'). "
        "Test items without a prediction are counted and named. Prints a table (with --dataset, beside the "
        "published C-DiffSET and stage-1 rows) and writes evaluation.json and evaluation.md. --protocol "
        "release scores as the C-DiffSET release did for the paper's numbers. See docs/evaluation.md.",
    )
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of translated (predicted) EO images")
    p.add_argument("--target", required=True, metavar="DIR", help="folder of the ground-truth EO images")
    _add_metric_options(p)
    p.add_argument("--batch-size", dest="eval_batch_size", type=int, default=16,
                   help="images per network call (default: %(default)s)")
    p.add_argument("--device", help="torch device for the networks (default: cuda if available, else cpu)")
    p.add_argument("--skip-bad", action="store_true", help=SKIP_BAD_HELP)

    def run(a):
        from cdiff.evaluate import run_evaluate

        run_evaluate(a.pred, a.target, _evaluation_options(a), device=_device(a.device))

    p.set_defaults(run=run)


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="turn a downloaded dataset into the form the field's tables were made on (SpaceNet6 chips)",
        description="Prepare a dataset as the published SAR-to-EO tables (GeoSET, ReFlowSET) prepared it. "
        "See docs/datasets.md for where to get each dataset.",
    )
    datasets = p.add_subparsers(title="datasets", metavar="DATASET")
    sn6 = datasets.add_parser(
        "spacenet6",
        help="build the 256-px SpaceNet6 chips of the frozen train/test lists from the 900-px tiles",
        description="Read the tiles of the frozen SpaceNet6 lists (2,558 train, 495 test) under SRC "
        "(the folder holding train/AOI_11_Rotterdam/PS-RGB and SAR-Intensity) and write OUT/{train,test}B/<stem>.png "
        "(EO, bicubic to 256 px) and OUT/{train,test}A/<stem>.png (SAR: HH, HV, VV in dB through the fixed window "
        "of sar_stretch.json, bilinear to 256 px), each with its georeferencing in <stem>.png.aux.xml. A rerun "
        "skips chips already written; complete folders are checked against GeoSET's pixel digests. Needs "
        "rasterio (pip install 'cdiffset[geo]').",
    )
    sn6.add_argument("src", metavar="SRC", help="the extracted SpaceNet6 training archive (holds train/AOI_11_Rotterdam/)")
    sn6.add_argument("out", metavar="OUT", help="folder for the chips (created if missing; existing chips are kept)")
    sn6.add_argument("--split", choices=("train", "test"), action="append",
                     help="build only this list (repeatable; default: both)")
    sn6.add_argument("--limit", type=int, metavar="N", help="only the first N tiles of each list (a quick look)")
    _add_overwrite(sn6, "rebuild chips that already exist in OUT")

    def run(a):
        from cdiff.data.spacenet6_chips import prepare_spacenet6

        summary = prepare_spacenet6(a.src, a.out, splits=tuple(a.split or ("train", "test")), limit=a.limit,
                                    overwrite=a.overwrite)
        print(f"cdiff prepare spacenet6: {summary['written']} chip pairs written, {summary['skipped']} already there "
              f"-> {a.out}")
        for folder, same in summary["digests"].items():
            print(f"  {folder}: {'matches' if same else 'DIFFERS FROM'} GeoSET's published pixel digest")

    sn6.set_defaults(run=run)
    p.set_defaults(run=lambda a: p.print_help())


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _add_fetch(sub) -> None:
    p = sub.add_parser(
        "fetch",
        help="download pretrained weights by name (SD 2.1-base, the released C-DiffSET models, metric networks)",
        description="Download the files of each NAME (see --list) into the cache, resuming a cut download and "
        "checking every file's size and hash; nothing is downloaded except on this command. Hub files go to the "
        "Hugging Face cache (HF_HOME, HF_HUB_CACHE), the metric networks to torch's hub cache (TORCH_HOME), both "
        "under --cache-dir if given. With --convert, a model is also written as cdiff's native file, so that "
        "'cdiff translate --model NAME' and cdiff.load_pipeline(NAME) use it. NAME may also be an address: "
        "hf://owner/repo/path@revision or https://... . Offline (HF_HUB_OFFLINE=1, or no network), cached files "
        "are used; each model's licence is printed at its first fetch.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="model names (e.g. cdiffset-qxs-saropt) or addresses")
    p.add_argument("--list", action="store_true", help="list every name with its size, licence, source and what is cached")
    p.add_argument("--convert", action="store_true", help="also write the native model file that --model NAME reads")
    p.add_argument("--cache-dir", metavar="DIR", help="keep everything under DIR (default: $CDIFF_CACHE_DIR, else the "
                   "Hugging Face and torch caches)")
    p.add_argument("--endpoint", metavar="URL", help="the hub's address (default: $HF_ENDPOINT, else https://huggingface.co)")
    _add_overwrite(p, "with --convert: convert again though the native file exists")

    def run(a):
        from cdiff.fetch import list_models, run_fetch

        if a.list:
            print(list_models(a.cache_dir))
            if not a.names:
                return
        run_fetch(a.names, convert=a.convert, cache_dir=a.cache_dir, endpoint=a.endpoint, overwrite=a.overwrite)

    p.set_defaults(run=run)


def _add_overwrite(p, what: str) -> None:
    # Outputs are checked before the work starts (cdiff.files.check_output); this is the one
    # way to write over something that exists.
    p.add_argument("--overwrite", action="store_true", help=what)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdiff",
        description="C-DiffSET SAR-to-EO translation on a plain-PyTorch Stable Diffusion 2.1 stack. "
        "Run 'cdiff demo' for a first look, 'cdiff COMMAND --help' for each command.",
    )
    parser.add_argument("--version", action="version", version=f"cdiff {cdiff.__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_demo(sub)
    _add_synth(sub)
    _add_convert(sub)
    _add_export(sub)
    _add_translate(sub)
    _add_evaluate(sub)
    _add_fetch(sub)
    _add_train(sub)
    _add_distill(sub)
    _add_cache_latents(sub)
    _add_prepare(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    try:
        args.run(args)
    except (ValueError, KeyError, OSError) as err:
        # Bad input is reported in one line that names the file or argument; no traceback.
        print(f"cdiff: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        # An optional dependency is missing (open_clip for convert, rasterio for GeoTIFFs).
        print(f"cdiff: error: {err}", file=sys.stderr)
        return 3
    except Interrupted as stop:  # a signal, handled: the message says what was kept
        print(f"cdiff: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("cdiff: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
