"""The bundled demo model on the CPU: one 256-px image through ``cdiff translate``'s path against
the demo's own path, the same model file, steps and noise.

- ``translate``: what ``cdiff translate --model weights/cdiff-demo-tiny.safetensors --dtype fp32``
  runs per image: cdiff.translators.open_cdiffset (load_pipeline, the U-Net in --dtype, the VAE
  in fp32 whatever the file holds) and translate_scenes;
- ``demo``: what ``cdiff demo`` runs: cdiff.demo.load_demo_model (everything fp32) and
  cdiff.demo.translate.

The file stores the model in fp16. The ratio translate / demo should be close to 1; it was about
17 when translate kept the VAE in the file's fp16 (``--translate-vae fp16`` runs that again:
PyTorch's fp16 convolutions on a CPU are many times slower than fp32 ones).

    python -m benchmarks.bench_demo_model --threads 1 --clock thread
    python -m benchmarks.bench_demo_model --threads 1 --clock thread --steps 2 --repeats 1 --translate-vae fp16
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import common
from cdiff.demo import DEMO_MODEL, Protocol, heldout_pairs, load_demo_model, sar_batch
from cdiff.demo import translate as demo_translate
from cdiff.geo import SarScene
from cdiff.translators import Sampling, open_cdiffset


def paths(size: int, steps: int, translate_vae: str) -> dict:
    """name -> a call translating one held-out synthetic scene of ``size`` px with ``steps`` DDIM steps."""
    protocol = Protocol(scenes=1, size=size, steps=steps)
    sar = sar_batch(heldout_pairs(protocol))  # (1, 3, H, W) in [-1, 1]
    sampling = Sampling(steps=steps, tiling=None)
    translator = open_cdiffset(DEMO_MODEL, sampling, None, torch.device("cpu"), "fp32", None)
    if translate_vae == "fp16":
        translator.args[0].vae.half()  # the pipeline inside translate_scenes
    scene = SarScene(sar[0].permute(1, 2, 0).numpy(), None, None)  # (H, W, 3), as read from a file
    demo = load_demo_model()
    return {
        "translate": lambda: translator([scene], ["scene"], sampling),
        "demo": lambda: demo_translate(demo, sar, protocol),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=Protocol.steps,
                        help="DDIM steps (default: %(default)s, the demo's)")
    parser.add_argument("--translate-vae", choices=("fp32", "fp16"), default="fp32",
                        help="the VAE's dtype on the translate path: fp32 (cdiff's), or fp16 (the file's: as before)")
    common.add_common_arguments(parser, repeats=5, warmup=1)
    args = parser.parse_args(argv)
    common.apply_threads(args)
    device = torch.device("cpu")
    print(common.header(device, f"the demo model ({DEMO_MODEL.name}, stored in fp16), one {args.size}-px image, "
                                f"{args.steps} DDIM steps; translate's VAE {args.translate_vae}"))
    with torch.no_grad():
        seconds = common.interleaved(paths(args.size, args.steps, args.translate_vae), device, args.warmup,
                                     args.repeats)
    ratio = seconds["translate"] / seconds["demo"]
    print(f"| path | s per image |\n|---|---|\n| translate | {seconds['translate']:.2f} |\n"
          f"| demo | {seconds['demo']:.2f} |\ntranslate / demo: {ratio:.2f}")
    settings = f"{args.size}px steps={args.steps} translate_vae={args.translate_vae} repeats={args.repeats}"
    rows = [dict(figure="demo model per image", impl=name, device=common.device_name(device), dtype="fp32",
                 settings=settings, ms=value * 1e3, ratio=ratio if name == "translate" else 1.0,
                 cpu_load=common.cpu_load()) for name, value in seconds.items()]
    common.append_csv(args.csv, rows, __file__)


if __name__ == "__main__":
    main()
