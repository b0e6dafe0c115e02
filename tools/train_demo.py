"""Make the bundled demo model, weights/cdiff-demo-tiny.safetensors, on the CPU.

    python -m tools.train_demo                                   # the bundled model (C-Diff loss)
    python -m tools.train_demo --loss mse --vae weights/cdiff-demo-tiny.safetensors \\
        --out /tmp/demo-mse.safetensors                           # the Table-3 arm: plain L2, same VAE
    python -m tools.train_demo --loss mse --seed 1 --vae weights/cdiff-demo-tiny.safetensors \\
        --latents runs-ablation/latents --out runs-ablation/l2-seed1.safetensors   # one run of the seed ablation

1. VAE (tools/demo_vae.py): the tiny VAE on synthetic EO and SAR windows, its scaling_factor
   set so the scaled latents have unit standard deviation. ``--vae FILE`` takes the VAE (and
   prompt embedding) of a native model instead, e.g. the bundled one: the same VAE this recipe
   trains, as training is deterministic, without its minutes.
2. The starting model, a native file that `cdiff train` starts from (model.init): that VAE, a
   fresh tiny 8-in/5-out U-Net whose variance channel is zero-initialised as the C-DiffSET
   surgery makes it (so the C-Diff loss starts as plain L2), and the fixed prompt embedding.
3. `cdiff cache-latents` encodes the training pairs (seeds 0 .. data.count - 1) with that VAE
   (``--latents DIR`` keeps the cache in DIR, or reuses the one there: runs that share a VAE
   share it).
4. `cdiff train` with configs/demo-tiny.toml (C-Diff loss, or ``--loss mse``) trains the U-Net.
   ``--seed N`` is the training seed: the U-Net's initialisation (UNET_SEED + N) and train.seed
   (the config's + N: the noise, the time steps and the order of the pairs); the VAE stays.
5. The trained model is written as one native file in fp16 (the demo loads it in fp32), and
   beside it a .json record: the objective, the recipe, the seconds (wall and this process's CPU
   time), and the scores of the model and of the two baselines on held-out scenes
   (cdiff.demo.Protocol; seeds from cdiff.demo.HELDOUT_SEED).

Every random draw comes from seeded generators, and the thread count is fixed (``--threads``):
the same command on the same machine gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

import cdiff
from cdiff.demo import DEMO_MODEL, SCORE_PROTOCOLS, baseline_scores, measure
from cdiff.files import check_output, write_text
from cdiff.testing import PROMPT_TOKENS
from cdiff.train import load_config, train
from cdiff.train.config import to_dict
from cdiff.train.latents import cache_latents
from tools.demo_vae import VAERecipe, train_vae

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo-tiny.toml"
CONTEXT_SEED = 0  # the fixed prompt embedding: seeded N(0, 1), (6, 1024); the demo has no text encoder
UNET_SEED = 2025  # the fresh U-Net's initialisation (plus --seed)


def start_unet(seed: int) -> cdiff.UNet:
    """The tiny 8-in/5-out U-Net with default init; its variance channel starts at exactly 1, as after the surgery."""
    torch.manual_seed(seed)
    unet = cdiff.UNet(cdiff.UNetConfig.tiny(in_channels=8, out_channels=5))
    with torch.no_grad():
        unet.conv_out.weight[4:].zero_()
        unet.conv_out.bias[4:].zero_()
    return unet


def first_stage(args) -> tuple[cdiff.VAE, torch.Tensor, dict]:
    """(VAE, prompt embedding (L, 1024), its record): trained now, or read from ``args.vae``."""
    if args.vae:
        pipeline = cdiff.load_pipeline(args.vae, dtype=torch.float32)
        return pipeline.vae, pipeline.context, {"from": str(args.vae)}
    recipe = VAERecipe(steps=args.vae_steps)
    vae = train_vae(recipe)
    context = torch.randn(PROMPT_TOKENS, 1024, generator=torch.Generator().manual_seed(CONTEXT_SEED))
    # Rounded to fp16 now, as the bundled file stores them: the U-Net trains on the latents of the VAE it ships with.
    vae, context = vae.half().float(), context.half().float()
    return vae, context, {**asdict(recipe), "context_seed": CONTEXT_SEED}


def objective(model: dict) -> dict:
    """What the U-Net is trained to output, from the config's [model] section (a record's field)."""
    return {"prediction": model["prediction"], "variance": model["loss"] == "cdiff",
            "loss": {"cdiff": "C-Diff (confidence-guided beta-NLL)", "mse": "l2"}[model["loss"]]}


def latent_cache(config, folder: Path) -> Path:
    """The latent cache in ``folder``: reused if it is there (training checks it holds this VAE's
    latents), else made there."""
    if (folder / "index.json").is_file():
        return folder
    return cache_latents(config, folder)


def scores(model_file: Path, training_pairs: int) -> dict:
    """Per protocol of cdiff.demo.SCORE_PROTOCOLS: the model's mean PSNR, SSIM, SCC on its held-out
    scenes, and the two baselines' (the mean EO image of the ``training_pairs`` training scenes; SAR as RGB)."""
    pipeline = cdiff.load_pipeline(model_file, dtype=torch.float32)
    return {name: {"protocol": asdict(p), "model": measure(pipeline, p), **baseline_scores(p, training_pairs)}
            for name, p in SCORE_PROTOCOLS.items()}


def rescore(model_file: Path) -> int:
    """Measure ``model_file`` again with today's protocols and replace the scores of its record."""
    record_file = model_file.with_suffix(".json")
    if not record_file.is_file():
        raise SystemExit(f"train_demo: --rescore: {record_file} not found (tools/train_demo.py writes it beside the model)")
    record = json.loads(record_file.read_text())
    record["scores"] = scores(model_file, record["training"]["config"]["data"]["count"])
    write_text(record_file, json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["scores"], indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEMO_MODEL), help="the native model file to write (default: %(default)s); "
                        "its .json record is written beside it")
    parser.add_argument("--loss", choices=("cdiff", "mse"), default="cdiff",
                        help="the U-Net's loss: the C-Diff loss, or plain L2 (the paper's Table 3 ablation)")
    parser.add_argument("--vae", metavar="NATIVE_FILE",
                        help="take the VAE and prompt embedding of this native model instead of training them")
    parser.add_argument("--seed", type=int, default=0, help="the training seed: U-Net initialisation and train.seed "
                        "offset by it; the VAE does not change (default: %(default)s, the bundled model's)")
    parser.add_argument("--latents", metavar="DIR", help="the latent cache: reused if DIR holds one (it must be of this "
                        "VAE), else made there and kept (default: made in --work)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; results depend on it (default: %(default)s)")
    parser.add_argument("--vae-steps", type=int, default=VAERecipe.steps, help="VAE steps (default: %(default)s)")
    parser.add_argument("--unet-steps", type=int, help="U-Net steps (default: train.steps of the config)")
    parser.add_argument("--pairs", type=int, help="U-Net training pairs, seeds 0 .. N - 1 (default: data.count of the config)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a value of configs/demo-tiny.toml, as cdiff train --set does (repeatable)")
    parser.add_argument("--work", help="keep the starting model, latent cache and training run here "
                        "(a new folder; default: a temporary one)")
    parser.add_argument("--rescore", action="store_true",
                        help="train nothing: measure --out again (e.g. after a change of cdiff.demo.Protocol) and "
                        "replace the scores in its .json record")
    args = parser.parse_args(argv)
    if args.rescore:
        torch.set_num_threads(args.threads)
        return rescore(Path(args.out))
    out = check_output(args.out, "file", overwrite=True, suffix=".safetensors")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    train_seed = load_config(CONFIG).train.seed + args.seed
    sets = [f"model.loss={args.loss}", f"train.seed={train_seed}", *args.set]
    if args.unet_steps is not None:
        sets += [f"train.steps={args.unet_steps}", f"train.save_every={args.unet_steps}"]
    if args.pairs is not None:
        sets.append(f"data.count={args.pairs}")
    load_config(CONFIG, sets)  # a bad --set fails now, not after the VAE's minutes

    start, start_cpu = time.perf_counter(), time.process_time()
    vae, context, vae_record = first_stage(args)
    vae_seconds, vae_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(f"VAE: {vae_seconds:.0f} s ({vae_cpu:.0f} s CPU), scaling_factor {vae.config.scaling_factor}")

    with tempfile.TemporaryDirectory(prefix="cdiff-demo-") as scratch:
        work = Path(args.work) if args.work else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        start_file = cdiff.save_native(work / "start.safetensors", start_unet(UNET_SEED + args.seed), vae, context)
        config = load_config(CONFIG, [f"model.init={start_file}", "data.latents=\"\"", *sets])
        latents = latent_cache(config, Path(args.latents) if args.latents else work / "latents")
        config = load_config(CONFIG, [f"model.init={start_file}", f"data.latents={latents}", *sets])
        done = train(config, work / "run")
        unet = (done.task.ema.module if done.task.ema is not None else done.task.unet).eval()
        train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        cdiff.save_native(out, unet.half(), vae.half(), context.half(), prediction=config.model.prediction)

    record = {
        "model": out.name,
        "objective": objective(to_dict(config)["model"]),
        "scores": scores(out, config.data.count),
        "training": {
            "seconds": round(train_seconds), "vae_seconds": round(vae_seconds), "threads": args.threads,
            "cpu_seconds": round(train_cpu), "vae_cpu_seconds": round(vae_cpu), "seed": args.seed,
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "command": "python -m tools.train_demo " + " ".join(sys.argv[1:] if argv is None else argv),
            "vae": vae_record, "unet_seed": UNET_SEED + args.seed, "config": to_dict(config),
        },
    }
    write_text(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["scores"], indent=2))
    print(f"training: {train_seconds:.0f} s ({train_cpu:.0f} s CPU) on {args.threads} thread(s) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
