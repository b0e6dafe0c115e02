"""The demo recipe's loss ablation over training seeds: C-Diff against plain L2 (the paper's Table 3).

    nice -n 10 python -m studies.synthetic.ablation_seeds                  # trains what is missing, one run at a time
    python -m studies.synthetic.ablation_seeds --collect --summary weights/ablation-seeds.json   # the committed summary

Each run is tools/train_demo.py with ``--loss cdiff`` or ``--loss mse`` and ``--seed N`` (the
U-Net's initialisation and train.seed; see there), the VAE and prompt embedding of the bundled
model (the VAE the recipe trains, bit for bit, so every run shares it) and one latent cache,
written into ``--runs`` (default runs-ablation/, git-ignored) as ``<arm>-seed<N>.safetensors`` and
its .json record. A run whose record is there is done: stopping this script and starting it again
trains only what is missing. The C-Diff arm's seed 0 is the bundled model itself when its record's
recipe is the runs' (checked: the same config but for paths, the same U-Net seed), so it is not
trained twice.

After each run ``--summary`` is rewritten (default runs-ablation/ablation-seeds.json, beside the
runs; ``--collect --summary weights/ablation-seeds.json`` writes the committed copy): per run its
command, its CPU seconds (tools/train_demo.py's, this process's CPU time on ``--threads`` threads)
and its mean PSNR / SSIM / SCC on the 64 held-out scenes (cdiff.demo.SCORE_PROTOCOLS["heldout"]);
per arm the mean and the sample standard deviation over the seeds done so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

from cdiff.demo import DEMO_MODEL, DEMO_RECORD
from cdiff.files import write_text
from cdiff.train import load_config
from cdiff.train.config import to_dict
from tools.train_demo import CONFIG, UNET_SEED

ROOT = Path(__file__).resolve().parents[2]

ARMS = {"cdiff": "cdiff", "l2": "mse"}  # arm -> tools/train_demo.py --loss
METRICS = ("psnr", "ssim", "scc")
PATH_KEYS = (("model", "init"), ("data", "latents"))  # where the runs differ without a different recipe


def recipe(record: dict) -> dict:
    """A record's config without its paths, and its U-Net seed: equal for runs of one recipe and seed."""
    config = json.loads(json.dumps(record["training"]["config"]))
    for section, key in PATH_KEYS:
        config[section].pop(key, None)
    return {"config": config, "unet_seed": record["training"]["unet_seed"]}


def defaults(config) -> dict:
    """Each section's keys at their dataclass defaults."""
    return {section.name: {f.name: f.default for f in dataclasses.fields(getattr(config, section.name))
                           if f.default is not dataclasses.MISSING} for section in dataclasses.fields(config)}


def same_recipe(record: dict, expected: dict, default: dict) -> bool:
    """Records written before a config key existed lack it, and keep keys removed since: a key only
    today's config has counts as the same recipe at its default, a key only the record has when it
    was off (falsy); every key both have must be equal."""
    if record["unet_seed"] != expected["unet_seed"]:
        return False
    a, b = record["config"], expected["config"]
    for section in set(a) | set(b):
        old, new = a.get(section, {}), b.get(section, {})
        for key in set(old) | set(new):
            if key in old and key in new:
                if old[key] != new[key]:
                    return False
            elif key in new:
                if key not in default.get(section, {}) or new[key] != default[section][key]:
                    return False
            elif old[key]:
                return False
    return True


def run_command(arm: str, seed: int, runs: Path, threads: int) -> list[str]:
    return [sys.executable, "-m", "tools.train_demo", "--loss", ARMS[arm], "--seed", str(seed),
            "--vae", str(DEMO_MODEL), "--latents", str(runs / "latents"), "--threads", str(threads),
            "--out", str(runs / f"{arm}-seed{seed}.safetensors")]


def record_of(arm: str, seed: int, runs: Path) -> Path | None:
    """The record of run (arm, seed) if it is done: the bundled model's for C-Diff seed 0 when it
    was made by today's recipe (configs/demo-tiny.toml, the C-Diff loss, seed 0)."""
    own = runs / f"{arm}-seed{seed}.json"
    if own.is_file():
        return own
    if (arm, seed) == ("cdiff", 0) and DEMO_RECORD.is_file():
        config = load_config(CONFIG, ["model.loss=cdiff", "model.init=x", "data.latents=x"])
        expected = {"config": json.loads(json.dumps(to_dict(config))), "unet_seed": UNET_SEED}  # tuples as lists
        for section, key in PATH_KEYS:
            expected["config"][section].pop(key)
        default = json.loads(json.dumps(defaults(config)))
        return DEMO_RECORD if same_recipe(recipe(json.loads(DEMO_RECORD.read_text())), expected, default) else None
    return None


def entry(record_file: Path, arm: str, seed: int) -> dict:
    record = json.loads(record_file.read_text())
    training, heldout = record["training"], record["scores"]["heldout"]
    return {
        "arm": arm, "seed": seed, "file": str(record_file.with_suffix(".safetensors").relative_to(ROOT))
        if record_file.is_relative_to(ROOT) else str(record_file.with_suffix(".safetensors")),
        "objective": record["objective"], "command": training["command"].replace(f"{ROOT}/", ""),
        "cpu_seconds": training["cpu_seconds"], "vae_cpu_seconds": training["vae_cpu_seconds"],
        "threads": training["threads"], "heldout": {m: heldout["model"][m] for m in METRICS},
    }


def summary(runs: Path, seeds: list[int]) -> dict:
    done = [entry(f, arm, seed) for arm in ARMS for seed in seeds if (f := record_of(arm, seed, runs)) is not None]
    arms = {}
    for arm in ARMS:
        rows = [r["heldout"] for r in done if r["arm"] == arm]
        arms[arm] = {"seeds_done": [r["seed"] for r in done if r["arm"] == arm]}
        for m in METRICS:
            values = [row[m] for row in rows]
            arms[arm][m] = {"mean": statistics.fmean(values) if values else None,
                            "std": statistics.stdev(values) if len(values) > 1 else None}
    return {
        "what": "the demo recipe (tools/train_demo.py, configs/demo-tiny.toml) per loss arm and training seed, "
                "one shared VAE; scores: mean over held-out scenes 1,000,000-1,000,063 (128 px, DDIM 20, eta 0, "
                "noise seed 0); std: sample standard deviation over the seeds",
        "seeds": seeds, "arms": arms, "runs": done,
        "missing": [f"{arm}-seed{seed}" for arm in ARMS for seed in seeds if record_of(arm, seed, runs) is None],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=str(ROOT / "runs-ablation"), help="the runs' folder (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: %(default)s)")
    parser.add_argument("--summary", default=str(ROOT / "runs-ablation" / "ablation-seeds.json"),
                        help="the JSON to rewrite after each run (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (default: %(default)s)")
    parser.add_argument("--collect", action="store_true", help="train nothing; rewrite --summary from the records")
    args = parser.parse_args(argv)
    runs = Path(args.runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)

    def write():
        write_text(Path(args.summary), json.dumps(summary(runs, args.seeds), indent=2) + "\n")

    write()
    if args.collect:
        return 0
    # Seed by seed, both arms: a partial set still compares the arms on the same seeds.
    for seed in args.seeds:
        for arm in ARMS:
            if record_of(arm, seed, runs) is not None:
                continue
            command = run_command(arm, seed, runs, args.threads)
            print("ablation_seeds:", " ".join(command), flush=True)
            subprocess.run(command, check=True, cwd=ROOT)
            write()
    print(json.dumps(summary(runs, args.seeds)["arms"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
