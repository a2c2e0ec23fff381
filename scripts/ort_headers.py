"""Install ONNX Runtime's C/C++ API headers, which edgeadapt's ONNX Runtime kernel is built
against (edgeadapt/runtime/backends/onnxruntime/kernel.py), into
``<sys.prefix>/include/onnxruntime``.

The onnxruntime wheels ship no headers. Debian packages them as ``libonnxruntime-dev`` (from
Debian 13, version 1.21: API version 21, which every newer onnxruntime serves). This script
asks the machine's own Debian mirror (read from its apt sources) for that package with a
private apt configuration, so the system's sources and package state are left as they are,
unpacks the headers and their copyright file (MIT), and copies them into place atomically.

    python scripts/ort_headers.py [TARGET]        # make setup runs it

Exits 0 when the headers are already there or were installed, 1 (with the reason) otherwise;
without them the runtime simply does not use the kernel.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "libonnxruntime-dev"
#: Debian suites that have the package, tried after the machine's own
SUITES = ("trixie",)
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


def archive_uris(deb822: list[str], legacy: str = "") -> list[str]:
    """The Debian archive URIs (not the security archive) in apt source texts: ``URIs:`` lines
    of deb822 ``.sources`` files, then ``deb URI suite ...`` lines of a ``sources.list``."""
    uris = [u for t in deb822 for u in re.findall(r"^URIs:\s*(\S+)", t, re.M)]
    uris += re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", legacy, re.M)
    return [u for u in uris if "debian" in u and "security" not in u]


def debian_mirror() -> tuple[str, str]:
    """(the first Debian archive URI in this machine's apt sources, the system's codename)."""
    codename = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            codename = line.split("=", 1)[1].strip('"')
    legacy = Path("/etc/apt/sources.list")
    uris = archive_uris(
        [p.read_text() for p in sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))],
        legacy.read_text() if legacy.is_file() else "")
    if not uris:
        raise SystemExit("ort_headers: no Debian archive in the apt sources (not Debian?); "
                         f"install {PACKAGE} another way or set EDGEADAPT_ORT_INCLUDE")
    return uris[0], codename


def fetch(workdir: Path) -> Path:
    """Download and unpack the package into ``workdir``; the unpacked include folder."""
    uri, codename = debian_mirror()
    signed = f" [signed-by={KEYRING}]" if KEYRING.is_file() else ""
    (workdir / "lists" / "partial").mkdir(parents=True)
    (workdir / "cache" / "archives" / "partial").mkdir(parents=True)
    suites = [s for s in (codename, *SUITES) if s]
    (workdir / "sources.list").write_text(
        "".join(f"deb{signed} {uri} {s} main\n" for s in dict.fromkeys(suites)))
    apt = ["-o", f"Dir::Etc::sourcelist={workdir / 'sources.list'}",
           "-o", "Dir::Etc::sourceparts=/dev/null", "-o", f"Dir::State::Lists={workdir / 'lists'}",
           "-o", f"Dir::Cache={workdir / 'cache'}", "-o", "APT::Sandbox::User=root"]
    for cmd in (["apt-get", *apt, "-qq", "update"], ["apt-get", *apt, "-qq", "download", PACKAGE]):
        done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"ort_headers: {' '.join(cmd[:1] + cmd[-2:])} failed:\n"
                             f"{done.stderr[-1500:]}")
    deb, = workdir.glob(f"{PACKAGE}_*.deb")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir / "root")], check=True)
    include = workdir / "root" / "usr" / "include" / "onnxruntime"
    copyright_file = workdir / "root" / "usr" / "share" / "doc" / PACKAGE / "copyright"
    if copyright_file.is_file():
        shutil.copy(copyright_file, include / "COPYRIGHT.debian")
    return include


def main(argv: list[str]) -> int:
    target = Path(argv[0]) if argv else Path(sys.prefix) / "include" / "onnxruntime"
    if (target / "onnxruntime_cxx_api.h").is_file():
        print(f"ort_headers: already in {target}")
        return 0
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        print("ort_headers: no apt-get/dpkg-deb here; the ONNX Runtime kernel stays off "
              f"(install {PACKAGE}, or set EDGEADAPT_ORT_INCLUDE)", file=sys.stderr)
        return 1
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ort-headers-") as tmp:
        try:
            include = fetch(Path(tmp))
        except SystemExit as exc:
            print(exc, file=sys.stderr)
            return 1
        staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=".onnxruntime-"))
        shutil.copytree(include, staged, dirs_exist_ok=True)
        staged.rename(target)  # atomic: the kernel sees no headers or all of them
    print(f"ort_headers: installed {PACKAGE} headers into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
