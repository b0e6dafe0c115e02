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
        "sar.png / eo.png / confidence.png into OUT_DIR. Until a trained demo model ships, "
        "the tiny stack has seeded random weights, so the EO image is noise-like.",
    )
    p.add_argument("--out", default="cdiff-demo", help="output folder (default: %(default)s)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels, a multiple of 8 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scene, the weights and the noise (default: %(default)s)")
    p.set_defaults(run=lambda a: __import__("cdiff.demo").demo.run_demo(a.out, size=a.size, steps=a.steps, seed=a.seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdiff",
        description="C-DiffSET SAR-to-EO translation on a plain-PyTorch Stable Diffusion 2.1 stack. "
        "Run 'cdiff demo' for a first look, 'cdiff COMMAND --help' for each command.",
    )
    parser.add_argument("--version", action="version", version=f"cdiff {cdiff.__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, KeyError, OSError) as err:
        # Bad input is reported in one line that names the file or argument; no traceback.
        print(f"cdiff: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
