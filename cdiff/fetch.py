"""``cdiff fetch``: pretrained weights by name (the table of cdiff.zoo) or by address, into the cache
(cdiff.hub); with ``--convert``, into cdiff's native file, which ``cdiff translate --model NAME``
and ``cdiff.load_pipeline(NAME)`` then read:

    cdiff fetch cdiffset-qxs-saropt --convert
    cdiff translate --model cdiffset-qxs-saropt --input sar/ --output eo/

Each name's licence is printed the first time its files are fetched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from cdiff import flags, hub, zoo


def run_fetch(
    names: list[str],
    convert: bool = False,
    cache_dir=None,
    endpoint: str | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
    show_progress: bool = True,
    retries: int = hub.RETRIES,
) -> list[Path]:
    """Fetch every name or address of ``names``; the local path of each (with ``convert``, the
    native file of each name that has one). All names are checked before any download."""
    if not names:
        raise ValueError("cdiff fetch: give a model NAME or an address (`cdiff fetch --list` shows the names)")
    addresses = [name for name in names if name.startswith(("hf://", "https://", "http://"))]
    if convert and addresses:
        raise ValueError(f"{addresses[0]}: --convert takes model names; convert a file with `cdiff convert`")
    targets = [(name, hub.parse_address(name)) if name in addresses else zoo.lookup(name) for name in names]
    options = dict(cache_dir=cache_dir, endpoint_url=endpoint, echo=echo, show_progress=show_progress, retries=retries)
    results = []
    for target in targets:
        if isinstance(target, tuple):
            results.append(_fetch_address(*target, options))
        else:
            results.append(_fetch_model(target, convert, overwrite, options))
    return results


def _fetch_address(address: str, remote: hub.Remote, options: dict) -> Path:
    echo = options["echo"]
    echo(f"{address}: licence unknown to cdiff; check its source before use")
    path = _fetch_file(remote, options)
    echo(f"{address}: {path}")
    return path


def _fetch_file(remote: hub.Remote, options: dict) -> Path:
    try:
        return hub.fetch(remote, **options)
    except hub.OfflineError as err:
        cached = zoo.cached_names(options["cache_dir"])
        where = f"cached: {', '.join(cached)}" if cached else "nothing cdiff knows by name is cached"
        raise hub.OfflineError(f"{err}; offline, {where} (`cdiff fetch --list`)") from None


def _fetch_model(model: zoo.Model, convert: bool, overwrite: bool, options: dict) -> Path:
    echo, cache_dir = options["echo"], options["cache_dir"]
    cached, total = zoo.status(model, cache_dir)
    echo(f"{model.name}: {model.what}")
    if cached < total and not hub.offline():  # the first fetch: say the terms before the download starts
        print_licence(model, echo)
        echo(f"  {total - cached} of {total} files to fetch (about {hub.describe(model.size)} in all)")
    paths = {remote: _fetch_file(remote, options) for remote in model.files}
    if cached == total:
        echo(f"  all {total} files cached")
    if model.convert is None:
        for remote, path in paths.items():
            echo(f"  {path}")
        from_env = flags.get_path("CDIFF_CACHE_DIR")
        if cache_dir is not None and (from_env is None or Path(cache_dir).resolve() != Path(from_env).resolve()):
            echo(f"  (cdiff evaluate finds these files when CDIFF_CACHE_DIR={cache_dir} is set; or give them with "
                 "--lpips-vgg / --fid-weights / --dists-weights / --dino)")
        elif from_env is None and any(isinstance(remote, hub.WebFile) for remote in paths):
            echo("  (torch's hub cache: cdiff evaluate, torchvision, lpips and pytorch-fid find the files there)")
        else:
            echo("  (cdiff evaluate finds these files there)")
        if convert:
            echo(f"  {model.name}: a network file, nothing to convert")
        return paths[model.files[0]]
    base, unet = _folders(model, paths)
    echo(f"  SD 2.1 files: {base}" + (f"\n  released U-Net: {unet}" if unet is not None else ""))
    if not convert:
        native = zoo.native_path(model.name, cache_dir)
        hint = "use it with --model" if native.is_file() else f"next: cdiff fetch {model.name} --convert"
        echo(f"  {hint} (cdiff translate --model {model.name} ...)")
        return unet or base
    return convert_model(model, base, unet, cache_dir, overwrite, echo)


def _folders(model: zoo.Model, paths: dict) -> tuple[Path, Path | None]:
    """(the SD 2.1 snapshot folder, the released U-Net's folder or None) of a fetched model."""
    base = next(path.parent for remote, path in paths.items() if remote.path == "model_index.json")
    unet = None
    if model.unet is not None:
        unet = next(path.parent for remote, path in paths.items() if remote.path == f"{model.unet}/config.json")
    return base, unet


def convert_model(model: zoo.Model, base: Path, unet: Path | None, cache_dir, overwrite: bool, echo) -> Path:
    """The native file of ``model`` (cdiff.convert): ``start`` applies the C-DiffSET surgery to SD 2.1,
    ``release`` keeps the released U-Net as it is (8-in/5-out, or stage 1's 8-in/4-out)."""
    from cdiff.convert import convert

    out = zoo.native_path(model.name, cache_dir)
    if out.is_file() and not overwrite:
        echo(f"  already converted: {out} (--overwrite converts again)")
        return out
    convert(base, out, unet=unet, plain=model.convert == "release", overwrite=True, echo=lambda line: echo(f"  {line}"))
    # The loaders find names through CDIFF_CACHE_DIR, not through this command's --cache-dir.
    found_by_name = zoo.native_path(model.name) == out
    echo(f"  ready: cdiff translate --model {model.name if found_by_name else out} --input SAR --output OUT"
         + ("" if found_by_name else f"  (or set CDIFF_CACHE_DIR={cache_dir} and use --model {model.name})"))
    return out


def print_licence(model: zoo.Model, echo) -> None:
    licence = zoo.LICENCES[model.licence]
    echo(f"  licence: {licence.title}\n    {licence.url}")
    for line in licence.terms:
        echo(f"    {line}")


def list_models(cache_dir=None) -> str:
    """The table of ``cdiff fetch --list``: every name, its size, licence, source, and what is cached."""
    rows = [("name", "size", "licence", "cached", "source")]
    for name, model in zoo.MODELS.items():
        cached, total = zoo.status(model, cache_dir)
        state = "yes" if cached == total else f"{cached}/{total} files" if cached else "no"
        if model.convert is not None and zoo.native_path(name, cache_dir).is_file():
            state += ", converted"
        rows.append((name, "~" + hub.describe(model.size), model.licence, state, model.source))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    lines.append("")
    lines += [f"{key}: {licence.title}, {licence.url}" for key, licence in zoo.LICENCES.items()]
    lines.append("")
    lines.append(f"hub files: {hub.hub_cache(cache_dir)} (Hugging Face cache layout)")
    lines.append(f"web files: {hub.web_cache(cache_dir)}")
    lines.append(f"converted: {hub.model_cache(cache_dir)}")
    lines.append("Names sharing files (the SD 2.1 VAE and text encoder) download them once.")
    return "\n".join(lines)
