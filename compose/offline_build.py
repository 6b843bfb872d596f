"""Build Tandem's images with neither Docker Hub nor a package index reachable from a build:

    python3 compose/offline_build.py [--cache-dir DIR] [--tag TAG]

1. A Debian base image made by debootstrap (python3 with venv, redis-server), brought in
   with `docker import`.
2. A wheelhouse of every dependency, downloaded by the base image's own pip (so that
   environment markers are evaluated for its Python) with this host's pip configuration,
   local wheel folders and CA bundle mounted read-only: where the host's pip takes a CPU
   torch from local disk, so does this.
3. The gateway and worker images from compose/Dockerfile with `WHEELS=wheelhouse` on that
   base, tagged `tandem-gateway:TAG` and `tandem-worker:TAG`.

Steps 1 and 2 are cached under the cache directory, keyed by a hash of their inputs; step
3 reuses Docker's layer cache. Needs root (debootstrap), a Docker engine and a docker
client that builds with BuildKit (`$DOCKER`, default `docker`). Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "compose"))
from requirements import requirements  # noqa: E402

DEFAULT_CACHE = Path("/var/cache/tandem-compose")
SUITE = "bookworm"
MIRROR = os.environ.get("TANDEM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# redis-server: the compose test's Redis (the official image needs Docker Hub).
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates", "redis-server",
                 "libgomp1", "hostname")  # fmt: skip
# The CPU build of torch (on our machines served from local disk by the host's pip
# configuration) and the build backend that `pip install --no-index .` needs.
TORCH = os.environ.get("TANDEM_WHEELHOUSE_TORCH", "torch==2.13.0")
BUILD_BACKEND = ("setuptools>=68", "wheel")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def docker(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([os.environ.get("DOCKER", "docker"), *args], check=check, **kwargs)


def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def base_image(cache: Path) -> str:
    """The debootstrapped base, imported from its cached root tarball when Docker lost it."""
    key = digest(SUITE, MIRROR, BASE_PACKAGES)
    name = f"tandem-compose-base:{key}"
    if image_id(name) is not None:
        return name
    tarball = cache / f"base-{key}.tar"
    if not tarball.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            root = Path(tmp) / "root"
            try:
                subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                                SUITE, str(root), MIRROR], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
            finally:
                unmount_below(root)  # debootstrap mounts /proc and /sys in the target
            for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for path in (root / leftovers).glob("*"):
                    if path.is_file():
                        path.unlink()
            partial = Path(tmp) / "base.tar"
            subprocess.run(["tar", "--one-file-system", "-C", str(root), "-cf", str(partial), "."],
                           check=True)  # fmt: skip
            partial.rename(tarball)  # only a whole tarball is ever in the cache
    with open(tarball, "rb") as f:
        docker("import", "-", name, stdin=f, stdout=subprocess.DEVNULL)
    return name


def unmount_below(root: Path) -> None:
    """Lazily unmount whatever a failed debootstrap left mounted inside `root`, so that
    removing the directory never reaches into the host's /proc or /sys."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False)


def host_pip_mounts() -> tuple[list[str], list[str]]:
    """`docker run` options giving a container this host's pip configuration: the PIP_*
    variables, the configuration files, and every local path they name (wheel folders,
    file:// indexes, constraint files, the CA bundle), read-only at the same place."""
    env = [f"--env={k}" for k in os.environ if k.startswith("PIP_")]
    debug = subprocess.run([sys.executable, "-m", "pip", "config", "debug"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    paths = {Path(p) for p in re.findall(r"^\s+(/\S+), exists: True", debug, re.M)}
    values = " ".join([listed, *(v for k, v in os.environ.items() if k.startswith("PIP_"))])
    for word in re.split(r"[\s'\"=]+", values):
        word = word.removeprefix("file://")
        path = Path(word)
        if word.startswith("/") and path.exists():
            # A file:// index's pages link to files beside its simple/ folder.
            paths.add(path.parent if path.name == "simple" else path)
    if HOST_CA_BUNDLE.exists():
        paths.add(HOST_CA_BUNDLE)
    return env, [f"--volume={p}:{p}:ro" for p in sorted(paths)]


def wheelhouse(cache: Path, base: str) -> Path:
    """Every wheel the two images install, resolved by the base image's own pip."""
    worker = requirements("worker", REPO)
    (bundled,) = requirements("bundled-model", REPO)
    target = cache / f"wheelhouse-{digest(base, worker, bundled, TORCH, BUILD_BACKEND)}"
    if (target / ".complete").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    env, volumes = host_pip_mounts()
    download = ["python3", "-m", "pip", "download", "--quiet", "--dest", "/wheelhouse"]
    script = " && ".join([
        " ".join([*download, *map(_quote, [*worker, TORCH, *BUILD_BACKEND])]),
        " ".join([*download, "--no-deps", _quote(bundled)]),
    ])  # fmt: skip
    docker("run", "--rm", "--network=host", *env, *volumes,
           f"--volume={target}:/wheelhouse", base, "sh", "-c", script)  # fmt: skip
    (target / ".complete").touch()
    return target


def _quote(requirement: str) -> str:
    return "'" + requirement.replace("'", "") + "'"


def build_images(base: str, wheels: Path, tag: str) -> dict[str, str]:
    """The gateway and worker images; the wheelhouse is linked into the build context."""
    context_wheels = REPO / "compose" / "wheelhouse"
    for old in context_wheels.glob("*.whl"):
        old.unlink()
    for wheel in wheels.glob("*.whl"):
        try:
            os.link(wheel, context_wheels / wheel.name)
        except OSError:  # another filesystem
            shutil.copy2(wheel, context_wheels / wheel.name)
    images = {}
    for target in ("gateway", "worker"):
        images[target] = f"tandem-{target}:{tag}"
        replaced = image_id(images[target])
        docker("build", "--file", str(REPO / "compose" / "Dockerfile"), "--target", target,
               "--build-arg", f"{target.upper()}_BASE_IMAGE={base}", "--build-arg", "WHEELS=wheelhouse",
               "--tag", images[target], str(REPO), env={**os.environ, "DOCKER_BUILDKIT": "1"})  # fmt: skip
        if replaced and replaced != image_id(images[target]):
            # The image this tag named before, now untagged: each source change would
            # otherwise leave one behind (a few hundred MB of its own layers).
            docker("image", "rm", replaced, check=False, capture_output=True)
    return images


def image_id(name: str) -> str | None:
    done = docker("image", "inspect", "--format", "{{.Id}}", name, capture_output=True,
                  text=True, check=False)  # fmt: skip
    return done.stdout.strip() if done.returncode == 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--tag", default="latest", help="tag of the two images")
    args = parser.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    base = base_image(args.cache_dir)
    images = build_images(base, wheelhouse(args.cache_dir, base), args.tag)
    print(json.dumps({"base": base, **images}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
