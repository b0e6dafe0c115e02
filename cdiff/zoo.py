"""The pretrained weights cdiff knows by name: one table (``MODELS``), and the lookups that use it
without touching the network (``lookup``, ``status``, ``resolve``).

Where each fact comes from (checked when this table was written; no download was possible then):
- SD 2.1-base: Stability's own repository is gone; the C-DiffSET authors' follow-up repository
  KAIST-VICLab/GeoSET loads the community mirror ``Manojb/stable-diffusion-2-1-base`` at revision
  0094d483... (its ``baselines/sd21-ft/README.md``, ``baselines/c-diffset/README.md`` and
  ``baselines/sd21-ft/make_init.py``). The file list is SD 2.1-base's diffusers layout (GeoSET
  lists no files; the mirror could not be listed from here). The mirror's VAE has sha256
  a1d99348..., byte-identical to stabilityai/sd-vae-ft-mse
  (KAIST-VICLab/ReFlowSET ``vae_audit/README.md``); cdiff checks it on top of the hub's hash.
- the released U-Nets: Hugging Face ``JeonghyeokDo/GeoSET``, ``baselines/<dataset>/c-diffset/``
  (8-in/5-out) and ``baselines/<dataset>/sd21-ft/`` (8-in/4-out), each
  ``diffusion_pytorch_model.safetensors`` + ``config.json``, licence CreativeML Open RAIL++-M
  (GeoSET ``MODEL_ZOO.md`` and the two baselines READMEs). The hub's branch ``main`` is used: no
  commit was published; the commit fetched is recorded in the cache (``refs/main``).
- LPIPS and FID networks: the addresses torchvision and pytorch-fid download from (cdiff.perceptual).
  DISTS: the authors' alpha/beta file that the DISTS_pytorch package loads (github.com/dingkeyan93/DISTS,
  ``DISTS_pytorch/weights.pt``, MIT) on top of torchvision's VGG16.
- DINO (GeoSET's evaluator: DINOv3-SAT ViT-L/16 patch tokens): Meta's Hugging Face repository
  ``facebook/dinov3-vitl16-pretrain-sat493m`` (gated, DINOv3 License), in the transformers layout
  (its three files as Meta's transformers repositories hold them; not listed from here). GeoSET's
  evaluator reads Meta's original ``dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth`` instead, which is
  handed out by Meta's download form, not at a fixed address.

Sizes are for the listing only (decimal units), from the parameter counts in fp32: U-Net 865.9M
(C-DiffSET 865.9M), VAE 83.7M, text encoder 340.4M parameters; torchvision's VGG16 file 527.8 MiB;
ReFlowSET's ``MODEL_ZOO.md`` gives 3,303 MiB for each released U-Net file. The download itself is
checked against the sizes and hashes the server sends.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from cdiff.hub import HubFile, Remote, WebFile, locate, model_cache

DATASETS = ("qxs-saropt", "sar2opt", "sar2eo", "spacenet6")  # GeoSET's dataset keys


@dataclass(frozen=True)
class Licence:
    title: str
    url: str
    terms: tuple[str, ...] = ()  # what the user must know before use, printed at the first fetch


OPENRAIL_TERMS = (
    "Open RAIL++-M is an open licence with use-based restrictions (its Attachment A). In short, the model",
    "and anything derived from it may not be used: to break the law; to exploit or harm minors; to make or",
    "spread verifiably false information meant to harm others, or personal data that can harm a person; to",
    "defame or harass; for fully automated decisions that adversely affect a person's legal rights; to",
    "discriminate against or harm people for their social behaviour, personal traits or legally protected",
    "characteristics, or to exploit the vulnerabilities of a group; to give medical advice or interpret",
    "medical results; to produce information for the administration of justice, law enforcement,",
    "immigration or asylum, such as predicting that a person will commit a crime. If you share the weights",
    "or a model derived from them, you must pass these restrictions on. This is a summary: the licence",
    "text at the address above is authoritative.",
)

LICENCES = {
    "openrail++": Licence(
        "CreativeML Open RAIL++-M (Stable Diffusion 2.1 and its derivatives)",
        "https://huggingface.co/JeonghyeokDo/GeoSET/blob/main/baselines/licenses/LICENSE-CreativeML-OpenRAIL++-M.txt",
        OPENRAIL_TERMS,
    ),
    "bsd-3-clause": Licence("BSD-3-Clause (torchvision's weights)",
                            "https://github.com/pytorch/vision/blob/main/LICENSE"),
    "apache-2.0": Licence("Apache-2.0 (pytorch-fid)", "https://github.com/mseitzer/pytorch-fid/blob/master/LICENSE"),
    "mit+bsd-3-clause": Licence(
        "MIT (DISTS alpha/beta, github.com/dingkeyan93/DISTS) + BSD-3-Clause (torchvision's VGG16)",
        "https://github.com/dingkeyan93/DISTS",
    ),
    "dinov3": Licence(
        "DINOv3 License (Meta); gated on the hub",
        "https://ai.meta.com/resources/models-and-libraries/dinov3-license",
        ("Meta's DINOv3 License governs use and redistribution; read it before use. The repository is",
         "gated: accept its terms on its hub page, then set HF_TOKEN."),
    ),
}


@dataclass(frozen=True)
class Model:
    """One name of ``cdiff fetch``: the files to fetch and what they are."""

    name: str
    what: str  # one line for the listing
    files: tuple[Remote, ...]
    size: int  # bytes of all files, approximate (the listing's figure)
    licence: str  # a key of LICENCES
    source: str  # where the weights come from, for the listing
    convert: str | None = None  # "start": SD 2.1 -> the C-DiffSET starting point; "release": a released U-Net as it is
    unet: str | None = None  # the released U-Net's folder in its repository (convert="release")


# --- SD 2.1-base, the community mirror the release uses ---------------------------------------

SD21_REPO = "Manojb/stable-diffusion-2-1-base"
SD21_REVISION = "0094d483a120f3f33dafbd187ea4aa60d10de75c"  # pinned by GeoSET's baselines/
SD21_VAE_SHA256 = "a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815"  # = stabilityai/sd-vae-ft-mse
UNET_BYTES, VAE_BYTES, TEXT_BYTES = 3_463_643_000, 334_616_000, 1_361_552_000  # fp32 parameters x 4


def _sd21(*paths: str) -> tuple[HubFile, ...]:
    recorded = {"vae/diffusion_pytorch_model.safetensors": SD21_VAE_SHA256}
    return tuple(HubFile(SD21_REPO, path, SD21_REVISION, recorded.get(path)) for path in paths)


SD21_VAE_AND_TEXT = _sd21(
    "model_index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
)
SD21_REST = _sd21(
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
)

# --- the released C-DiffSET and stage-1 U-Nets -----------------------------------------------

RELEASE_REPO = "JeonghyeokDo/GeoSET"
RELEASE_REVISION = "main"


def _released(dataset: str, method: str) -> Model:
    folder = f"baselines/{dataset}/{method}"
    stage = ("C-DiffSET" if method == "c-diffset" else "SD2.1 FT (C-DiffSET stage 1)")
    channels = "8-in/5-out" if method == "c-diffset" else "8-in/4-out"
    files = tuple(HubFile(RELEASE_REPO, f"{folder}/{name}", RELEASE_REVISION)
                  for name in ("config.json", "diffusion_pytorch_model.safetensors"))
    return Model(
        name=f"{'cdiffset' if method == 'c-diffset' else 'sd21ft'}-{dataset}",
        what=f"{stage} trained on {dataset}: the released U-Net ({channels}) + SD 2.1-base's VAE and text encoder",
        files=files + SD21_VAE_AND_TEXT,
        size=UNET_BYTES + VAE_BYTES + TEXT_BYTES,
        licence="openrail++",
        source=f"hf://{RELEASE_REPO}/{folder} + hf://{SD21_REPO}",
        convert="release",
        unet=folder,
    )


# --- the metric networks ---------------------------------------------------------------------

VGG16 = WebFile("https://download.pytorch.org/models/vgg16-397923af.pth", "vgg16-397923af.pth")
INCEPTION = WebFile(
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05-6726825d.pth",
)
DISTS_ALPHA_BETA = WebFile("https://raw.githubusercontent.com/dingkeyan93/DISTS/master/DISTS_pytorch/weights.pt",
                           "dists-alpha-beta.pt")  # saved under a name that says what it is
DINO_REPO = "facebook/dinov3-vitl16-pretrain-sat493m"


def _table() -> dict[str, Model]:
    models = [
        Model(
            "sd21-base",
            "Stable Diffusion 2.1-base (diffusers layout): U-Net, VAE, text encoder, tokenizer, scheduler",
            SD21_VAE_AND_TEXT + SD21_REST,
            UNET_BYTES + VAE_BYTES + TEXT_BYTES + 2_000_000,
            "openrail++",
            f"hf://{SD21_REPO}@{SD21_REVISION[:8]} (community mirror; the VAE = stabilityai/sd-vae-ft-mse)",
            convert="start",
        ),
        *(_released(dataset, method) for method in ("c-diffset", "sd21-ft") for dataset in DATASETS),
        Model("lpips-vgg", "torchvision's ImageNet VGG16, the trunk of LPIPS (VGG)", (VGG16,), 553_433_881,
              "bsd-3-clause", "download.pytorch.org (torchvision)"),
        Model("fid-inception", "pytorch-fid's Inception v3 (FID and KID features)", (INCEPTION,), 95_600_000,
              "apache-2.0", "github.com/mseitzer/pytorch-fid releases"),
        Model("dists", "DISTS: the authors' alpha/beta weights + torchvision's VGG16", (DISTS_ALPHA_BETA, VGG16),
              553_433_881 + 12_000, "mit+bsd-3-clause", "github.com/dingkeyan93/DISTS + download.pytorch.org"),
        Model("dino-sat", "DINOv3-SAT ViT-L/16 (transformers layout), the DINO metric's network; gated",
              tuple(HubFile(DINO_REPO, name)
                    for name in ("config.json", "model.safetensors", "preprocessor_config.json")),
              1_213_000_000, "dinov3", f"hf://{DINO_REPO} (Meta)"),
    ]
    return {model.name: model for model in models}


MODELS: dict[str, Model] = _table()


def lookup(name: str) -> Model:
    """The model called ``name``; an unknown name raises, suggesting the nearest ones."""
    if name in MODELS:
        return MODELS[name]
    near = difflib.get_close_matches(name, list(MODELS), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    raise ValueError(f"{name!r}: not a model cdiff knows; {hint}`cdiff fetch --list` shows every name "
                     "(any file also works as hf://owner/repo/path@revision or https://...)")


def status(model: Model, cache_dir=None) -> tuple[int, int]:
    """(cached files, files) of ``model``."""
    return sum(locate(f, cache_dir) is not None for f in model.files), len(model.files)


def cached_names(cache_dir=None) -> list[str]:
    """The names whose files are all cached."""
    return [name for name, model in MODELS.items() if status(model, cache_dir)[0] == len(model.files)]


def native_path(name: str, cache_dir=None) -> Path:
    """Where ``cdiff fetch NAME --convert`` writes the native model file."""
    return model_cache(cache_dir) / f"{name}.safetensors"


def resolve(source):
    """``source`` as it is, unless it is a model name of this table (and no file or folder of
    that name exists): then its converted native file. Used by ``cdiff.load_pipeline`` and so
    by ``cdiff translate --model``; never touches the network."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    name = os.fspath(source)
    if name not in MODELS or Path(name).exists():
        return source
    model = MODELS[name]
    if model.convert is None:
        raise ValueError(f"{name}: a metric network, not a translation model")
    path = native_path(name)
    if path.is_file():
        return path
    cached, total = status(model)
    done = "its files are cached but not converted" if cached == total else "it is not fetched yet"
    raise FileNotFoundError(
        f"{name}: a cdiff model name; {done} ({path} is missing): run `cdiff fetch {name} --convert`"
    )
