"""Build driver for repkernels.

The compiled extension ``repkernels._C`` is described in ``CMakeLists.txt`` (sources, flags, CUDA
architectures); this file only decides whether it can be built here and runs CMake.

Build against the installed torch, without build isolation::

    pip install -r requirements-build.txt
    pip install --no-build-isolation .

Environment knobs:

* ``CUDA_HOME``               CUDA toolkit root (default: torch's guess, then ``/usr/local/cuda``).
* ``TORCH_CUDA_ARCH_LIST``    architectures to compile for (default ``8.0;9.0+PTX``).
* ``REPKERNELS_BUILD_EXT``    ``auto`` (default): build ``_C`` when a CUDA torch and nvcc are found;
                              ``1``: require it (the build fails if it cannot be made);
                              ``0``: never build it.
* ``MAX_JOBS``                parallel compile jobs (default: number of CPUs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def read_version() -> str:
    text = (ROOT / "python" / "repkernels" / "_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def _say(msg: str) -> None:
    print(f"repkernels: {msg}", file=sys.stderr, flush=True)


def find_cuda_toolchain() -> tuple[str | None, str]:
    """Return (CUDA_HOME or None, reason) for building the CUDA extension."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed in this environment (install torch first, build without isolation)"
    if torch.version.cuda is None:
        return None, f"the installed torch {torch.__version__} is a CPU-only build"
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        from torch.utils.cpp_extension import CUDA_HOME as torch_cuda_home

        candidates.append(torch_cuda_home)
    except Exception:  # noqa: BLE001 - torch's guess is only a hint
        pass
    candidates += [f"/usr/local/cuda-{torch.version.cuda}", "/usr/local/cuda"]
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return home, f"nvcc found under {home}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent), f"nvcc found at {nvcc}"
    return None, "no nvcc found (set CUDA_HOME to the CUDA toolkit)"


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    """Configure and build ``repkernels._C`` with CMake + Ninja, as described in CMakeLists.txt."""

    def run(self) -> None:
        mode = os.environ.get("REPKERNELS_BUILD_EXT", "auto").strip().lower()
        if mode in ("0", "false", "no", "off"):
            _say("REPKERNELS_BUILD_EXT=0: building WITHOUT the compiled extension repkernels._C "
                 "(the 'cuda' backend will be unavailable; Triton and reference backends work).")
            return
        cuda_home, reason = find_cuda_toolchain()
        if cuda_home is None:
            if mode in ("1", "true", "yes", "on"):
                raise RuntimeError(f"REPKERNELS_BUILD_EXT=1 but the CUDA extension cannot be built: {reason}")
            _say(f"building WITHOUT the compiled extension repkernels._C: {reason}. "
                 "The 'cuda' backend will be unavailable; Triton and reference backends work.")
            return
        _say(f"building the CUDA extension repkernels._C ({reason})")
        self._cuda_home = cuda_home
        super().run()

    def build_extension(self, ext: CMakeExtension) -> None:
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        # A fixed folder (not setuptools' temporary one) so that rebuilds are incremental.
        build_temp = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}"
        build_temp.mkdir(parents=True, exist_ok=True)

        env = dict(os.environ)
        env["CUDA_HOME"] = self._cuda_home
        env.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        env["PATH"] = f"{self._cuda_home}/bin{os.pathsep}{env.get('PATH', '')}"
        _say(f"CUDA architectures: {env['TORCH_CUDA_ARCH_LIST']}")

        cfg = "Debug" if self.debug else "Release"
        configure = [
            "cmake", "-S", ext.sourcedir, "-B", str(build_temp), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_CUDA_COMPILER={self._cuda_home}/bin/nvcc",
            f"-DCUDAToolkit_ROOT={self._cuda_home}",
            f"-DTORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}",
            f"-DREPKERNELS_OUTPUT_DIR={out_dir}",
            f"-DREPKERNELS_TORCH_VERSION={torch.__version__}",
        ]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        try:
            subprocess.run(configure, cwd=build_temp, env=env, check=True)
        except subprocess.CalledProcessError:
            # A failed configure caches what it did not find (e.g. CUDA_INCLUDE_DIRS-NOTFOUND): start clean next time.
            (build_temp / "CMakeCache.txt").unlink(missing_ok=True)
            raise
        subprocess.run(["cmake", "--build", str(build_temp), "--target", "_C", "-j", jobs],
                       cwd=build_temp, env=env, check=True)
        built = list(out_dir.glob("_C.*"))
        if not built:
            raise RuntimeError(f"CMake finished but produced no _C module in {out_dir}")


def discover_packages() -> list[str]:
    """``python/repkernels`` plus the two top-level folders installed as its subpackages."""
    packages = find_packages(str(ROOT / "python"))
    for sub, folder in (("triton_kernels", "triton_kernels"), ("bench", "bench")):
        packages.append(f"repkernels.{sub}")
        packages += [f"repkernels.{sub}.{p}" for p in find_packages(str(ROOT / folder))]
    return packages


def install_requires() -> list[str]:
    # A wheel with _C is tied to the torch it was compiled against (C++ ABI).
    try:
        import torch

        base = torch.__version__.split("+")[0]
    except ImportError:
        return ["torch>=2.6"]
    mode = os.environ.get("REPKERNELS_BUILD_EXT", "auto").strip().lower()
    will_build = mode not in ("0", "false", "no", "off") and find_cuda_toolchain()[0] is not None
    return [f"torch=={base}"] if will_build else ["torch>=2.6"]


setup(
    name="repkernels",
    version=read_version(),
    description="CUDA and Triton kernels for re-parameterized and dynamic convolutions",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={
        "repkernels": "python/repkernels",
        "repkernels.triton_kernels": "triton_kernels",
        "repkernels.bench": "bench",
    },
    packages=discover_packages(),
    ext_modules=[CMakeExtension("repkernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=install_requires(),
    extras_require={
        "bench": ["matplotlib", "tqdm"],
        "models": ["torchvision"],
        "test": ["pytest", "numpy", "torchvision", "matplotlib", "tqdm"],
    },
    zip_safe=False,
)
