"""The ``cdiff`` command. Each subcommand's work lives in the module it names; this file
only turns arguments into one call, so ``cdiff X --help`` and the Python API stay in step."""

from __future__ import annotations

import argparse
import sys

import cdiff


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="translate a synthetic SAR scene to EO with the tiny stack and write PNGs",
        description="Smoke run of the whole pipeline on the CPU in seconds: make a synthetic SAR "
        "scene, encode it with the VAE, run DDIM with the U-Net, decode, and write "
        "sar.png, eo.png, eo_reference.png and confidence.png into --out. Until a trained demo model ships, "
        "the tiny stack has seeded random weights, so the EO image is noise-like.",
    )
    p.add_argument("--out", default="cdiff-demo", help="output folder (default: %(default)s)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels, a multiple of 64 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scene, the weights and the noise (default: %(default)s)")

    def run(a):
        from cdiff.demo import run_demo

        run_demo(a.out, size=a.size, steps=a.steps, seed=a.seed)

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

        write_synthetic(
            a.out_dir, a.count, size=a.size, seed=a.seed, looks=a.looks or None,
            discrepancies=a.discrepancies, misregistrations=a.misregistrations, overwrite=a.overwrite,
        )

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
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="cast the weights (default: keep the stored dtype)")
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
        # An optional dependency is missing (open_clip for convert, tifffile for GeoTIFFs).
        print(f"cdiff: error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
