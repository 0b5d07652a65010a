"""The set-up logic of `make test` / `make bench` / `make wheel` (Makefile) and of setup.py, without installing or
building anything: `make -n` dry runs against a private stamp folder, and setup.py's helpers on fake toolchains."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None or not (ROOT / "Makefile").is_file(),
                                reason="needs make and the source checkout")
STAMPS = ("torch.stamp", "deps.stamp", "build.stamp")


def make(*args: str, stamps: Path, env: dict | None = None) -> str:
    """`make -n ARGS` with this interpreter as the environment and ``stamps`` as the stamp folder; its output."""
    run_env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "TORCH")}
    run_env.update(env or {})
    out = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), f"S={stamps}",
                          f"PYTHON={sys.executable}", *args], capture_output=True, text=True, env=run_env, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture
def stamps(tmp_path):
    """A stamp folder in which every step is done: the stamps are newer than their inputs and the value files."""
    folder = tmp_path / "make"
    make("env", stamps=folder)  # writes the value files (env, deps-missing, build-want) as make reads the Makefile
    assert (folder / "env").read_text().split()[0] == sys.executable
    old = time.time() - 3600
    for value in ("env", "deps-missing", "build-want"):
        os.utime(folder / value, (old, old))
    (folder / "constraints.txt").write_text("torch==0\n")
    for stamp in STAMPS:
        (folder / stamp).touch()
    return folder


def steps(out: str) -> set[str]:
    found = set()
    if "keeping this environment's torch" in out:  # the torch step (it installs torch when asked or missing)
        found.add("torch")
    if "-r requirements-test.txt" in out:
        found.add("deps")
    if "--no-build-isolation --no-deps -e ." in out:
        found.add("build")
    if "-m pytest tests" in out:
        found.add("pytest")
    if "-m repkernels.bench" in out:
        found.add("bench")
    return found


def test_second_run_only_runs_the_command(stamps):
    assert steps(make("test", stamps=stamps)) == {"pytest"}
    out = make("bench", "ARGS=--quick --ops depthwise_conv2d", stamps=stamps)
    assert steps(out) == {"bench"}
    assert "-m repkernels.bench --quick --ops depthwise_conv2d" in out


def test_test_command_is_readmes(stamps):
    out = make("test", "ARGS=-x -k depthwise", stamps=stamps)
    assert f"{sys.executable} -m pytest tests -x -k depthwise" in out
    assert f"{sys.executable} -m pytest tests/test_make.py" in make("test", "TESTS=tests/test_make.py", stamps=stamps)
    assert "python -m pytest tests" in (ROOT / "README.md").read_text()


def test_changed_requirements_redo_the_dependencies_and_the_build(stamps):
    old = time.time() - 7200
    os.utime(stamps / "deps.stamp", (old, old))  # older than requirements-*.txt
    assert steps(make("test", stamps=stamps)) == {"deps", "build", "pytest"}


def test_a_requirement_removed_by_hand_redoes_the_dependencies(stamps):
    (stamps / "deps-missing").write_text("somepackage\n")  # rewritten with what is missing now as make reads it
    assert steps(make("test", stamps=stamps)) == {"deps", "build", "pytest"}


def test_changed_sources_redo_only_the_build(stamps):
    old = time.time() - 7200
    os.utime(stamps / "build.stamp", (old, old))  # as if csrc/ or setup.py had changed since
    assert steps(make("test", stamps=stamps)) == {"build", "pytest"}


def test_build_knobs_are_inputs(stamps):
    out = make("test", stamps=stamps, env={"TORCH_CUDA_ARCH_LIST": "9.0", "REPKERNELS_BUILD_EXT": "1"})
    assert steps(out) == {"build", "pytest"}
    assert "TORCH_CUDA_ARCH_LIST=9.0" in (stamps / "build-want").read_text()


def test_another_environment_redoes_everything(stamps):
    (stamps / "env").write_text("/some/other/python /some/other 1 2.0.0\n")  # rewritten as make reads the Makefile
    assert steps(make("test", stamps=stamps)) == {"torch", "deps", "build", "pytest"}


def test_torch_is_kept_unless_another_is_named(stamps):
    import torch

    assert steps(make("test", f"TORCH={torch.__version__.split('+')[0]}", stamps=stamps)) == {"pytest"}
    out = make("test", "TORCH=2.99.0", stamps=stamps)
    assert steps(out) == {"torch", "deps", "build", "pytest"}
    assert '[ "2.99.0" != keep ]' in out and '"torch==2.99.0"' in out


def test_wheel_is_named_for_torch_and_checked(stamps):
    out = make("wheel", stamps=stamps)
    assert "REPKERNELS_LOCAL_VERSION=auto" in out
    assert "wheel -v --no-build-isolation --no-deps" in out
    assert "auditwheel repair" in out and "--exclude 'libtorch.so'" in out and "--exclude 'libcudart.so.*'" in out
    assert "install -q --no-deps" in out and "-m pip --disable-pip-version-check check" in out
    assert "torch.ops.repkernels.depthwise_conv2d" in (ROOT / "Makefile").read_text()


def info(env: dict, *args: str) -> str:
    run_env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "MAKEFLAGS",
                                                                "MAKELEVEL")}
    run_env.update(env)
    out = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "info", *args], capture_output=True,
                         text=True, env=run_env, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.splitlines()[0]


def test_environment_choice(tmp_path):
    assert "the activated environment (VIRTUAL_ENV)" in info({"VIRTUAL_ENV": str(tmp_path / "act")})
    assert info({"VIRTUAL_ENV": str(tmp_path / "act")}).startswith(f"python:  {tmp_path / 'act'}/bin/python ")
    assert "PYTHON given on the command line" in info({}, f"PYTHON={sys.executable}")
    # no activated environment, no ./.venv, and a python3 without torch: a new .venv
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    path = f"{bare / 'bin'}{os.pathsep}{os.environ['PATH']}"
    line = info({"PATH": path}, f"VENV={tmp_path / 'nothing-here'}")
    assert f"python:  {tmp_path / 'nothing-here'}/bin/python " in line and "a new" in line


def test_environment_choice_reuses_a_cuda_torch(tmp_path):
    import torch

    if torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch in this interpreter")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (tmp_path / "bin" / "python3").chmod(0o755)
    line = info({"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}, f"VENV={tmp_path / 'nothing-here'}")
    assert "python3 on PATH already has torch" in line, line


# --- setup.py ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup_py():
    """setup.py's functions, without running setup()."""
    src = (ROOT / "setup.py").read_text()
    ns = {"__file__": str(ROOT / "setup.py"), "__name__": "setup_py_under_test"}
    exec(compile(src[:src.index("\nsetup(\n")], str(ROOT / "setup.py"), "exec"), ns)  # noqa: S102
    return ns


def fake_toolkit(tmp_path: Path) -> tuple[Path, Path]:
    """A toolkit folder (bin/nvcc) and, elsewhere, a wrapper script `nvcc` that reports it as TOP, as the
    /usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc wrapper does."""
    home = tmp_path / "cuda-99.0"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("#!/bin/sh\nexit 0\n")
    wrapper_dir = tmp_path / "wrapper" / "bin"
    wrapper_dir.mkdir(parents=True)
    (wrapper_dir / "nvcc").write_text(f"#!/bin/sh\necho '#$ _HERE_={home}/bin' >&2\necho '#$ TOP={home}/bin/..' >&2\n")
    for f in (home / "bin" / "nvcc", wrapper_dir / "nvcc"):
        f.chmod(0o755)
    return home, wrapper_dir


def test_toolkit_root_from_a_wrapper_nvcc(setup_py, tmp_path):
    home, wrapper_dir = fake_toolkit(tmp_path)
    assert setup_py["nvcc_toolkit_root"](wrapper_dir / "nvcc") == home.resolve()
    (tmp_path / "silent").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "silent").chmod(0o755)
    assert setup_py["nvcc_toolkit_root"](tmp_path / "silent") is None


def test_find_cuda_toolchain_order(setup_py, tmp_path, monkeypatch):
    import torch

    if torch.version.cuda is None:
        pytest.skip("a CPU torch builds no _C, whatever the toolkit")
    home, wrapper_dir = fake_toolkit(tmp_path)
    find = setup_py["find_cuda_toolchain"]
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper_dir}{os.pathsep}{os.environ['PATH']}")
    find.cache_clear()
    assert find()[0] == str(home.resolve())  # TOP of the wrapper, not the wrapper's parent folder
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "set-by-hand"))
    (tmp_path / "set-by-hand" / "bin").mkdir(parents=True)
    (tmp_path / "set-by-hand" / "bin" / "nvcc").write_text("")
    find.cache_clear()
    assert find()[0] == str(tmp_path / "set-by-hand")  # CUDA_HOME, when set, wins
    find.cache_clear()


def test_cmake_is_this_environments(setup_py):
    exe, where = setup_py["find_cmake"]()
    try:
        import cmake
    except ImportError:
        pytest.skip("no cmake package here (pip install -r requirements-build.txt)")
    assert Path(exe).parent == Path(cmake.CMAKE_BIN_DIR), (exe, where)
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    assert setup_py["_version_tuple"](version) >= (3, 26), version


def test_local_version(setup_py, monkeypatch):
    import torch

    monkeypatch.setenv("REPKERNELS_LOCAL_VERSION", "")
    assert setup_py["version"]() == setup_py["read_version"]()  # pip install . / -e .: the plain version
    monkeypatch.setenv("REPKERNELS_LOCAL_VERSION", "torch2.14cu130")
    assert setup_py["version"]().endswith("+torch2.14cu130")
    monkeypatch.setenv("REPKERNELS_LOCAL_VERSION", "auto")
    monkeypatch.setenv("REPKERNELS_BUILD_EXT", "0")
    assert "+" not in setup_py["version"]()  # no _C: a pure-Python wheel runs with any torch
    monkeypatch.setenv("REPKERNELS_BUILD_EXT", "1")
    setup_py["find_cuda_toolchain"].cache_clear()
    if setup_py["find_cuda_toolchain"]()[0] is not None:
        major_minor = ".".join(torch.__version__.split(".")[:2])
        suffix = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        assert setup_py["version"]().endswith(f"+torch{major_minor}{suffix}")
    monkeypatch.setenv("REPKERNELS_LOCAL_VERSION", "not a label!")
    with pytest.raises(ValueError):
        setup_py["version"]()
