"""Build driver for repkernels.

The compiled extension ``repkernels._C`` is described in ``CMakeLists.txt`` (sources, flags, CUDA
architectures); this file only decides whether it can be built here and runs CMake.

Build against the installed torch, without build isolation::

    pip install -r requirements-build.txt
    pip install --no-build-isolation .

Environment knobs:

* ``CUDA_HOME``               CUDA toolkit root. Default: the toolkit of the ``nvcc`` on PATH, as nvcc itself
                              reports it (``#$ TOP=`` of ``nvcc -v --dryrun``; right when that nvcc is a
                              wrapper script elsewhere), then torch's guess, then ``/usr/local/cuda``.
* ``TORCH_CUDA_ARCH_LIST``    architectures to compile for (default ``8.0;9.0+PTX``).
* ``REPKERNELS_BUILD_EXT``    ``auto`` (default): build ``_C`` when a CUDA torch and nvcc are found;
                              ``1``: require it (the build fails if it cannot be made);
                              ``0``: never build it.
* ``REPKERNELS_LOCAL_VERSION`` a local version label appended to the version (``0.1.0+<label>``), for wheels
                              built for one torch; ``auto``: ``torch<major.minor>cu<XY>`` (``cpu`` for a CPU
                              torch) when ``_C`` is built, nothing otherwise. Unset (the default, and what
                              ``pip install .`` / ``-e .`` use): the plain version. ``make wheel`` sets ``auto``.
* ``MAX_JOBS``                parallel compile jobs (default: number of CPUs).

CMake and Ninja come from this Python environment's ``cmake`` and ``ninja`` packages (requirements-build.txt)
when they are installed, so an older ``cmake`` first on PATH is not used; else from PATH. The build folder
``build/cmake-pyXY`` is kept between builds (incremental); it is configured afresh when the Python, torch or
toolkit it was configured for changes. Ninja's progress lines carry the elapsed time (``NINJA_STATUS``).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
MIN_CMAKE = (3, 26)  # cmake_minimum_required in CMakeLists.txt


def read_version() -> str:
    text = (ROOT / "python" / "repkernels" / "_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def _say(msg: str) -> None:
    print(f"repkernels: {msg}", file=sys.stderr, flush=True)


def nvcc_toolkit_root(nvcc: str | Path) -> Path | None:
    """The toolkit root of ``nvcc`` as nvcc itself reports it (``#$ TOP=...`` of ``nvcc -v --dryrun``).

    Right where the ``nvcc`` on PATH is a wrapper script (``/usr/local/bin/nvcc`` running
    ``/usr/local/cuda-13.0/bin/nvcc``), which the parent folder of ``nvcc`` would get wrong."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([str(nvcc), "-v", "--dryrun", "repkernels_probe.cu"], cwd=tmp, capture_output=True,
                                 text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.MULTILINE)
    if not match:
        return None
    top = Path(match.group(1).strip().strip('"')).resolve()
    return top if (top / "bin" / "nvcc").is_file() else None


@functools.lru_cache(maxsize=None)
def find_cuda_toolchain() -> tuple[str | None, str]:
    """Return (CUDA_HOME or None, reason) for building the CUDA extension.

    Order: ``CUDA_HOME`` / ``CUDA_PATH`` when set (honoured as given), the toolkit of the ``nvcc`` on PATH (its
    ``TOP``), torch's guess, ``/usr/local/cuda-<torch's CUDA>``, ``/usr/local/cuda``. Every candidate is taken as
    the root its nvcc reports, so a folder whose ``bin/nvcc`` is a wrapper resolves to the real toolkit."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed in this environment (install torch first, build without isolation)"
    if torch.version.cuda is None:
        return None, f"the installed torch {torch.__version__} is a CPU-only build"
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if (Path(home) / "bin" / "nvcc").is_file():
                return home, f"nvcc found under {var}={home}"
            _say(f"{var}={home} has no bin/nvcc; looking elsewhere")
    nvcc = shutil.which("nvcc")
    if nvcc:
        top = nvcc_toolkit_root(nvcc)
        if top is not None:
            return str(top), f"toolkit {top}, reported by the nvcc on PATH ({nvcc})"
    candidates = []
    try:
        from torch.utils.cpp_extension import CUDA_HOME as torch_cuda_home

        candidates.append(torch_cuda_home)
    except Exception:  # noqa: BLE001 - torch's guess is only a hint
        pass
    candidates += [f"/usr/local/cuda-{torch.version.cuda}", "/usr/local/cuda"]
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").is_file():
            top = nvcc_toolkit_root(Path(home) / "bin" / "nvcc")
            return str(top or home), f"nvcc found under {top or home}"
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent), f"nvcc found at {nvcc}"
    return None, "no nvcc found (put the toolkit's nvcc on PATH or set CUDA_HOME to the CUDA toolkit)"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def find_cmake() -> tuple[str, str]:
    """(cmake executable, where from): this environment's ``cmake`` package first, then PATH.

    Not a plain ``cmake`` from PATH first: without an activated environment PATH has the system's CMake
    (3.25 on Debian 12), older than CMakeLists.txt needs, while requirements-build.txt installed a new one."""
    try:
        import cmake

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.is_file():
            return str(exe), f"the cmake package {getattr(cmake, '__version__', '?')} of this Python"
    except (ImportError, AttributeError):
        pass
    exe = shutil.which("cmake")
    if exe is None:
        raise RuntimeError("no CMake found: pip install -r requirements-build.txt (it installs cmake and ninja)")
    try:
        found = _version_tuple(subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout)
    except (OSError, subprocess.SubprocessError):
        found = ()
    if found and found < MIN_CMAKE:
        raise RuntimeError(f"{exe} is CMake {'.'.join(map(str, found))}, CMakeLists.txt needs "
                           f"{'.'.join(map(str, MIN_CMAKE))} or newer, and this Python has no cmake package: "
                           "pip install -r requirements-build.txt")
    return exe, f"{exe} from PATH (no cmake package in this Python: pip install -r requirements-build.txt)"


def find_ninja() -> str | None:
    """This environment's ``ninja`` package's executable, else the one on PATH (None: let CMake look)."""
    try:
        import ninja

        exe = Path(ninja.BIN_DIR) / "ninja"
        if exe.is_file():
            return str(exe)
    except (ImportError, AttributeError):
        pass
    return shutil.which("ninja")


def local_version_label() -> str:
    """The local version label from REPKERNELS_LOCAL_VERSION ('' for none); ``auto``: torch and CUDA of this build."""
    label = os.environ.get("REPKERNELS_LOCAL_VERSION", "").strip()
    if label.lower() != "auto":
        return label
    if not will_build_extension():
        return ""  # a pure-Python wheel runs with any torch: no label
    import torch

    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    cuda = torch.version.cuda
    return f"torch{major_minor}" + (f"cu{cuda.replace('.', '')}" if cuda else "cpu")


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
        env.setdefault("NINJA_STATUS", "[%f/%t %es] ")  # each compile step with the seconds since the build began
        _say(f"CUDA architectures: {env['TORCH_CUDA_ARCH_LIST']}")
        cmake_exe, cmake_from = find_cmake()
        _say(f"CMake: {cmake_exe} ({cmake_from})")
        ninja_exe = find_ninja()

        # Configured for another Python, torch or toolkit (another environment): configure afresh, since CMake
        # keeps what it found then (Torch_DIR, the Python and CUDA paths) in its cache.
        key = "\n".join([sys.executable, sys.prefix, torch.__version__, self._cuda_home, cmake_exe,
                         str(ninja_exe)]) + "\n"
        key_file = build_temp / "repkernels-configured-for.txt"
        if key_file.is_file() and key_file.read_text() != key and (build_temp / "CMakeCache.txt").is_file():
            _say(f"{build_temp} was configured for another environment: configuring afresh")
            (build_temp / "CMakeCache.txt").unlink()
            shutil.rmtree(build_temp / "CMakeFiles", ignore_errors=True)

        cfg = "Debug" if self.debug else "Release"
        configure = [
            cmake_exe, "-S", ext.sourcedir, "-B", str(build_temp), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_CUDA_COMPILER={self._cuda_home}/bin/nvcc",
            f"-DCUDAToolkit_ROOT={self._cuda_home}",
            f"-DTORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}",
            f"-DREPKERNELS_OUTPUT_DIR={out_dir}",
            f"-DREPKERNELS_TORCH_VERSION={torch.__version__}",
        ]
        if ninja_exe:
            configure.append(f"-DCMAKE_MAKE_PROGRAM={ninja_exe}")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        start = time.monotonic()
        try:
            subprocess.run(configure, cwd=build_temp, env=env, check=True)
        except subprocess.CalledProcessError:
            # A failed configure caches what it did not find (e.g. CUDA_INCLUDE_DIRS-NOTFOUND): start clean next time.
            (build_temp / "CMakeCache.txt").unlink(missing_ok=True)
            key_file.unlink(missing_ok=True)
            raise
        key_file.write_text(key)
        _say(f"configured in {time.monotonic() - start:.0f}s; compiling with {jobs} job(s) (MAX_JOBS), "
             "each step as [done/total elapsed]")
        start = time.monotonic()
        subprocess.run([cmake_exe, "--build", str(build_temp), "--target", "_C", "-j", jobs],
                       cwd=build_temp, env=env, check=True)
        built = list(out_dir.glob("_C.*"))
        if not built:
            raise RuntimeError(f"CMake finished but produced no _C module in {out_dir}")
        _say(f"built {built[0].name} in {time.monotonic() - start:.0f}s")


class BuildPy(build_py):
    """build_py that, when ``_C`` is not built, says so and drops a ``_C`` left in the build folder by an earlier
    build (it would go into the wheel)."""

    def run(self) -> None:
        super().run()
        if not extension_wanted():
            for stale in (Path(self.build_lib) / "repkernels").glob("_C.*"):
                stale.unlink()
            _say(f"building WITHOUT the compiled extension repkernels._C: {skip_reason()}. "
                 "The 'cuda' backend will be unavailable; Triton and reference backends work.")


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
    return [f"torch=={base}"] if will_build_extension() else ["torch>=2.6"]


def _build_ext_mode() -> str:
    mode = os.environ.get("REPKERNELS_BUILD_EXT", "auto").strip().lower()
    return "0" if mode in ("0", "false", "no", "off") else "1" if mode in ("1", "true", "yes", "on") else "auto"


def will_build_extension() -> bool:
    return _build_ext_mode() != "0" and find_cuda_toolchain()[0] is not None


def extension_wanted() -> bool:
    """Whether the package has the extension module: not with REPKERNELS_BUILD_EXT=0, nor in ``auto`` without a
    toolchain (then the wheel is pure Python, ``py3-none-any``); with ``1`` always (the build fails without one)."""
    return _build_ext_mode() == "1" or will_build_extension()


def skip_reason() -> str:
    return "REPKERNELS_BUILD_EXT=0" if _build_ext_mode() == "0" else find_cuda_toolchain()[1]


def version() -> str:
    label = local_version_label()
    if label and not re.fullmatch(r"[A-Za-z0-9]+(?:[._][A-Za-z0-9]+)*", label):
        raise ValueError(f"REPKERNELS_LOCAL_VERSION={label!r} is not a local version label (letters, digits, . _)")
    return read_version() + (f"+{label}" if label else "")


setup(
    name="repkernels",
    version=version(),
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
    package_data={"repkernels": ["py.typed"]},  # PEP 561: the package ships its type annotations
    ext_modules=[CMakeExtension("repkernels._C")] if extension_wanted() else [],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
    install_requires=install_requires(),
    extras_require={
        "bench": ["matplotlib", "tqdm"],
        "models": ["torchvision"],
        "test": ["pytest", "numpy", "torchvision", "matplotlib", "tqdm"],
    },
    zip_safe=False,
)
