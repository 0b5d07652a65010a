# The newcomer's path (README "The two commands"): every set-up step is here, and each is done once.
#
#   make test                 install what is missing, build _C, run `python -m pytest tests`   (ARGS="-k dw -x",
#                             TESTS=tests/test_build.py instead of tests)
#   make bench                the same set-up, then `python -m repkernels.bench`                (ARGS="--quick")
#   make wheel                a wheel for the installed torch, repaired with auditwheel, checked in a fresh venv
#   make env                  only the set-up (environment, torch, dependencies, _C)
#   make info                 which Python, torch and CUDA toolkit the set-up uses, and why
#   make clean                drop the stamps, the CMake build folder, _C and the wheels (not .venv)
#
# Which Python (the "environment"), first that applies:
#   1. PYTHON=/path/to/python on the command line;
#   2. an activated environment: $VIRTUAL_ENV (venv, virtualenv, uv) or $CONDA_PREFIX (conda);
#   3. ./.venv, when it exists (made by an earlier `make`);
#   4. the `python3` on PATH when it already has a CUDA build of torch (torch.version.cuda is not None, e.g. a
#      GPU image's system Python) and pip may install into it (no EXTERNALLY-MANAGED marker);
#   5. otherwise a new ./.venv (python3 -m venv).
# `make test PYTHON=.venv/bin/python` always uses (and if needed creates) ./.venv: what CI does.
#
# torch: an environment's existing torch is kept (its torchvision is matched to it); where there is none,
# torch==$(TORCH) (2.14.1) is installed. TORCH=X on the command line installs torch==X in any case.
# CUDA toolkit: setup.py takes CUDA_HOME when set, else the toolkit of the `nvcc` on PATH (what
# `nvcc -v --dryrun` prints as TOP); no CUDA_HOME needs setting by hand.
#
# A second run skips what is done: each step leaves a stamp in build/make/ that is newer than its inputs
# (the environment and its torch, TORCH=, requirements-*.txt and a requirement removed by hand, setup.py,
# pyproject.toml, CMakeLists.txt, csrc/**, REPKERNELS_BUILD_EXT / TORCH_CUDA_ARCH_LIST / CUDA_HOME). The package is installed editable, so
# edits under python/, triton_kernels/, bench/ and tests/ need no step at all; the CMake build folder
# (build/cmake-pyXY) makes a rebuild after a csrc/ edit recompile only what changed.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.ONESHELL:
.NOTPARALLEL:
.SUFFIXES:
.DEFAULT_GOAL := help

TORCH ?= 2.14.1
ARGS ?=
TESTS ?= tests
VENV := .venv
VENV_PY = $(abspath $(VENV))/bin/python
S := build/make
WHEEL_DIR ?= dist
PIP_FLAGS ?= --disable-pip-version-check

# Cheap probe of an interpreter (no torch import, ~30 ms): "<executable> <prefix> <prefix inode> <torch
# version|none> <torch cuda|none> <externally managed 0|1>", read from torch/version.py.
define PROBE
import importlib.util as u, os, re, sys, sysconfig
s = u.find_spec("torch")
p = os.path.join(list(s.submodule_search_locations)[0], "version.py") if s and s.submodule_search_locations else ""
t = open(p).read() if p and os.path.isfile(p) else ""
g = lambda k: (re.findall(r"^" + k + r"\b[^=\n]*=\s*[\x22\x27]([^\x22\x27]+)", t, re.M) or ["none"])[0]
em = sys.prefix == sys.base_prefix and os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
print(sys.executable, sys.prefix, os.stat(sys.prefix).st_ino, g("__version__"), g("cuda"), int(em))
endef
export PROBE

# The requirements (requirements-*.txt given as arguments) whose module cannot be found in this interpreter,
# comma-separated, or "-": a package removed by hand brings the dependency step back.
define MISSING_PROBE
import importlib.util as u, re, sys
lines = [line.split(chr(35))[0] for f in sys.argv[1:] for line in open(f)]
names = {m.group(1).lower().replace("-", "_") for m in (re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", x) for x in lines) if m}
print(",".join(sorted(n for n in names if u.find_spec(n) is None)) or "-")
endef
export MISSING_PROBE

ifeq ($(origin PYTHON),command line)
  ifeq ($(findstring /,$(PYTHON)),)
    override PYTHON := $(shell command -v $(PYTHON))
  endif
  ENV_WHY := PYTHON given on the command line
else ifneq ($(VIRTUAL_ENV),)
  PYTHON := $(VIRTUAL_ENV)/bin/python
  ENV_WHY := the activated environment (VIRTUAL_ENV)
else ifneq ($(CONDA_PREFIX),)
  PYTHON := $(CONDA_PREFIX)/bin/python
  ENV_WHY := the activated conda environment (CONDA_PREFIX)
else ifneq ($(wildcard $(VENV)/bin/python),)
  PYTHON := $(VENV_PY)
  ENV_WHY := ./$(VENV), made by an earlier make
else
  SYS_PROBE := $(shell python3 -c '$(PROBE)' 2>/dev/null)
  ifeq ($(and $(SYS_PROBE),$(filter-out none,$(word 5,$(SYS_PROBE))),$(filter 0,$(word 6,$(SYS_PROBE)))),)
    PYTHON := $(VENV_PY)
    ENV_WHY := no activated environment, and python3 has no CUDA build of torch (or is externally managed): a new ./$(VENV)
  else
    PYTHON := $(word 1,$(SYS_PROBE))
    ENV_WHY := python3 on PATH already has torch $(word 4,$(SYS_PROBE)) (CUDA $(word 5,$(SYS_PROBE)))
  endif
endif
# An absolute path (the venv's python is not resolved: it is a link), exported, and its folder first on PATH for the
# commands run in the environment (test, bench): subprocesses that run `python3` or $PYTHON (bench/gpu_check.sh) get
# the same environment, as if it were activated.
override PYTHON := $(abspath $(PYTHON))
ifeq ($(PYTHON),)
  $(error PYTHON names no interpreter: give a path, e.g. PYTHON=.venv/bin/python)
endif
export PYTHON
IN_ENV := PATH="$(dir $(PYTHON)):$$PATH"
PIP := $(PYTHON) -m pip $(PIP_FLAGS)

CSRC := $(shell find csrc -type f 2>/dev/null)
BUILD_INPUTS := setup.py pyproject.toml CMakeLists.txt $(CSRC) python/repkernels/_version.py
REQS := requirements-build.txt requirements-bench.txt requirements-test.txt

# --- value files ------------------------------------------------------------------------------------------------
# Refreshed while the Makefile is read (so `make -n` tells the truth), each rewritten only when its text changes:
# its mtime says when the value last changed, and the stamps that depend on it are redone after that.
#   env          the interpreter, its prefix (and the prefix's inode: the same path made anew is another
#                environment) and its torch: another environment, or a torch changed by hand, redoes every step;
#   deps-missing the requirements this environment lacks (see MISSING_PROBE);
#   build-want   the build's knobs.
write_value = $(shell mkdir -p $(S) && { [ "$$(cat $(1) 2>/dev/null)" = '$(2)' ] || printf '%s\n' '$(2)' > $(1); })
ENV_PROBE := $(if $(wildcard $(PYTHON)),$(shell $(PYTHON) -c '$(PROBE)' 2>/dev/null))
TORCH_HAVE := $(word 4,$(ENV_PROBE))
# "keep" the environment's torch, unless TORCH= names another one (then that step is redone: FORCE).
TORCH_WANT := $(if $(filter command line environment,$(origin TORCH)),$(if $(filter $(TORCH),$(TORCH_HAVE) \
  $(firstword $(subst +, ,$(TORCH_HAVE)))),keep,$(TORCH)),keep)
ifeq ($(filter clean help info,$(MAKECMDGOALS)),)
  _ := $(call write_value,$(S)/env,$(or $(wordlist 1,4,$(ENV_PROBE)),none))
  _ := $(call write_value,$(S)/deps-missing,$(or $(if $(ENV_PROBE),$(shell $(PYTHON) -c '$(MISSING_PROBE)' $(REQS) \
    2>/dev/null)),none))
  _ := $(call write_value,$(S)/build-want,REPKERNELS_BUILD_EXT=$(or $(REPKERNELS_BUILD_EXT),auto) \
    TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) CUDA_HOME=$(CUDA_HOME))
endif
# After a step that changes the environment itself (a new venv, another torch): its new identity.
refresh_env = $(PYTHON) -c "$$PROBE" | cut -d' ' -f1-4 > $(S)/env
refresh_missing = $(PYTHON) -c "$$MISSING_PROBE" $(REQS) > $(S)/deps-missing
# (after make clean in the same command line: made afresh)
$(S)/env $(S)/deps-missing $(S)/build-want:
	@mkdir -p $(@D) && touch $@

SAY := printf '\n==> %s\n'

.PHONY: help test bench wheel env info clean FORCE
FORCE:

help:
	@sed -n '1,10p' Makefile | sed 's/^# \{0,1\}//'

test: $(S)/build.stamp
	@echo; echo "==> [$(PYTHON)]" python -m pytest $(TESTS) $(ARGS)
	$(IN_ENV) $(PYTHON) -m pytest $(TESTS) $(ARGS)

bench: $(S)/build.stamp
	@echo; echo "==> [$(PYTHON)]" python -m repkernels.bench $(ARGS)
	$(IN_ENV) $(PYTHON) -m repkernels.bench $(ARGS)

env: $(S)/build.stamp
	@echo "ready: $(PYTHON)"

info:
	@echo "python:  $(PYTHON)  ($(ENV_WHY))"
	if [ -x $(PYTHON) ]; then
	  $(PYTHON) -c "$$PROBE" | { read -r exe prefix ino tv cuda em; echo "torch:   $$tv (CUDA $$cuda) in $$prefix"; }
	else echo "torch:   none yet ($(PYTHON) is made by make test / bench / env; then torch==$(TORCH))"; fi
	nvcc=$$(command -v nvcc || true)
	if [ -n "$${CUDA_HOME:-}" ]; then echo "toolkit: CUDA_HOME=$$CUDA_HOME"
	elif [ -n "$$nvcc" ]; then echo "toolkit: $$(realpath "$$(cd /tmp && $$nvcc -v --dryrun rk.cu 2>&1 | sed -n 's/^#\$$ TOP=//p' | head -1)") (TOP of $$nvcc)"
	else echo "toolkit: none (no nvcc on PATH, no CUDA_HOME): _C is not built"; fi
	echo "stamps:  $(S)/ ($$(cd $(S) 2>/dev/null && ls *.stamp 2>/dev/null | tr '\n' ' '))"

# --- the environment ------------------------------------------------------------------------------------------
$(VENV_PY):
	@$(SAY) "creating ./$(VENV) ($(ENV_WHY))"
	python3 -m venv $(VENV)
	$(refresh_env)

$(S)/torch.stamp: $(S)/env $(if $(filter keep,$(TORCH_WANT)),,FORCE) | $(PYTHON)
	@start=$$SECONDS
	have=$$($(PYTHON) -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || true)
	if [ "$(TORCH_WANT)" != keep ] || [ -z "$$have" ]; then
	  $(SAY) "installing torch==$(TORCH) into $(PYTHON) (a CUDA build: several GB, a few minutes)"
	  $(PIP) install "torch==$(TORCH)"
	  $(refresh_env)
	else
	  $(SAY) "keeping this environment's torch $$have (TORCH=X to install another)"
	fi
	# torchvision must match torch: 2.N -> 0.(N+15); both are pinned for every later pip call.
	$(PYTHON) -c "import importlib.metadata as m; v = m.version('torch'); n = int(v.split('.')[1]); \
	  print(f'torch=={v}'); print(f'torchvision==0.{n + 15}.*')" > $(S)/constraints.txt
	echo "    constraints: $$(tr '\n' ' ' < $(S)/constraints.txt)($$((SECONDS - start)) s)"
	touch $@

$(S)/deps.stamp: $(S)/torch.stamp $(S)/deps-missing $(REQS)
	@start=$$SECONDS
	$(SAY) "installing the build, test and bench dependencies ($(REQS))"
	$(PIP) install -c $(S)/constraints.txt $(addprefix -r ,$(REQS))
	$(refresh_missing)
	echo "    done ($$((SECONDS - start)) s)"
	touch $@

# --- the build --------------------------------------------------------------------------------------------------
# Editable install: _C is built into python/repkernels/ through build/cmake-pyXY (Ninja: one line per
# compile step, "[done/total elapsed]"); setuptools' file-by-file chatter is left out of the log.
$(S)/build.stamp: $(S)/deps.stamp $(S)/build-want $(BUILD_INPUTS)
	@start=$$SECONDS
	$(SAY) "building repkernels and its extension _C (pip install -e . --no-build-isolation; $${MAX_JOBS:-$$(nproc)} compile jobs; a full build takes minutes)"
	rm -f $@
	$(PIP) install -v --no-build-isolation --no-deps -e . 2>&1 \
	  | { grep --line-buffered -v -E '^ +(writing|creating|copying|adding|reading manifest|running (egg_info|dist_info|build_py|editable_wheel|bdist_wheel|build_src|install))( |$$)' || true; }
	echo "    done ($$((SECONDS - start)) s)"
	$(PYTHON) -c "from repkernels import _extension as e; print('    _C:', 'built' if e.HAS_C else 'not built (' + str(e.LOAD_ERROR) + ')')"
	touch $@

# --- the wheel --------------------------------------------------------------------------------------------------
$(S)/wheel-deps.stamp: $(S)/deps.stamp requirements-wheel.txt
	@$(SAY) "installing the wheel tools (requirements-wheel.txt)"
	$(PIP) install -c $(S)/constraints.txt -r requirements-wheel.txt
	touch $@

# A fresh venv with the same torch as the build environment, to install the wheel into (kept between runs;
# the torch install is the slow part; the wheel is reinstalled every time).
$(S)/wheel-check-venv.stamp: $(S)/torch.stamp
	@$(SAY) "a fresh venv for the install check: $(S)/wheel-check-venv with $$(head -1 $(S)/constraints.txt)"
	rm -rf $(S)/wheel-check-venv
	$(PYTHON) -m venv $(S)/wheel-check-venv
	$(S)/wheel-check-venv/bin/python -m pip $(PIP_FLAGS) install "$$(head -1 $(S)/constraints.txt)"
	touch $@

# REPKERNELS_LOCAL_VERSION=auto: setup.py names torch and CUDA in the version (0.1.0+torch2.14cu130) when it
# builds _C. A compiled wheel needs _C: REPKERNELS_BUILD_EXT=1 unless set (0: a pure-Python wheel).
# auditwheel leaves out the libraries that torch and its nvidia-* packages provide at run time.
AUDITWHEEL_EXCLUDES := libtorch.so libtorch_cpu.so libtorch_cuda.so libtorch_python.so libc10.so libc10_cuda.so \
  libcudart.so.* libcuda.so.* libcublas.so.* libcublasLt.so.* libcusparse.so.* libcudnn.so.* libnvrtc.so.* \
  libnvToolsExt.so.* libgomp.so.*

wheel: $(S)/wheel-deps.stamp $(S)/wheel-check-venv.stamp
	@start=$$SECONDS
	export REPKERNELS_BUILD_EXT=$${REPKERNELS_BUILD_EXT:-1} REPKERNELS_LOCAL_VERSION=auto
	rm -rf $(S)/wheel-raw && mkdir -p $(S)/wheel-raw $(WHEEL_DIR)
	$(SAY) "pip wheel --no-build-isolation --no-deps . (REPKERNELS_BUILD_EXT=$$REPKERNELS_BUILD_EXT)"
	$(PIP) wheel -v --no-build-isolation --no-deps -w $(S)/wheel-raw . 2>&1 \
	  | { grep --line-buffered -v -E '^ +(writing|creating|copying|adding|reading manifest|running (egg_info|dist_info|build_py|bdist_wheel|install|install_lib|install_egg_info|install_scripts))( |$$)' || true; }
	raw=$$(ls $(S)/wheel-raw/repkernels-*.whl)
	case "$$raw" in
	  *-none-any.whl)
	    $(SAY) "a pure-Python wheel (no _C): nothing to repair"
	    cp "$$raw" $(WHEEL_DIR)/; whl=$(WHEEL_DIR)/$$(basename "$$raw");;
	  *)
	    # _C's RUNPATH names this machine's torch and toolkit folders: the installed wheel finds torch beside it.
	    $(SAY) "RUNPATH of _C: \$$ORIGIN/../torch/lib (was: this machine's folders); auditwheel repair (torch's own libraries excluded)"
	    export PATH="$(dir $(PYTHON)):$$PATH"
	    rm -rf $(S)/wheel-unpacked && $(PYTHON) -m wheel unpack -d $(S)/wheel-unpacked "$$raw" > /dev/null
	    for so in $(S)/wheel-unpacked/*/repkernels/_C.*.so; do patchelf --set-rpath '$$ORIGIN/../torch/lib' "$$so"; done
	    rm -f "$$raw" && $(PYTHON) -m wheel pack -d $(S)/wheel-raw $(S)/wheel-unpacked/* > /dev/null
	    raw=$$(ls $(S)/wheel-raw/repkernels-*.whl); rm -rf $(S)/wheel-unpacked
	    LD_LIBRARY_PATH="$$($(PYTHON) -c "import os, torch; print(os.path.dirname(torch.__file__) + '/lib')"):$${LD_LIBRARY_PATH:-}" \
	      $(PYTHON) -m auditwheel repair $(foreach x,$(AUDITWHEEL_EXCLUDES),--exclude '$(x)') -w $(S)/wheel-repaired "$$raw"
	    whl=$$(ls -t $(S)/wheel-repaired/repkernels-*.whl | head -1)
	    mv -f "$$whl" $(WHEEL_DIR)/; whl=$(WHEEL_DIR)/$$(basename "$$whl"); rm -rf $(S)/wheel-repaired;;
	esac
	$(SAY) "install check: $$whl --no-deps into $(S)/wheel-check-venv (with $$(head -1 $(S)/constraints.txt))"
	venv=$(abspath $(S))/wheel-check-venv/bin/python
	$$venv -m pip $(PIP_FLAGS) uninstall -q -y repkernels 2>/dev/null || true
	$$venv -m pip $(PIP_FLAGS) install -q --no-deps "$$whl"
	$$venv -m pip $(PIP_FLAGS) check
	(cd /tmp && $$venv -W "ignore:Failed to initialize NumPy" -c "$$WHEEL_CHECK")
	echo
	echo "wheel: $$whl ($$(du -h "$$whl" | cut -f1), $$((SECONDS - start)) s)"

define WHEEL_CHECK
import torch, torch.nn.functional as F
import repkernels
from repkernels import _extension
from importlib.metadata import requires, version
print("installed:", "repkernels", version("repkernels"), "in", repkernels.__file__.rsplit("/", 2)[0])
print("requires:", ", ".join(r for r in requires("repkernels") if "extra ==" not in r))
if _extension.HAS_C:
    x, w = torch.randn(2, 3, 9, 9), torch.randn(3, 1, 3, 3)
    y = torch.ops.repkernels.depthwise_conv2d(x, w, None, [1, 1], [1, 1], [1, 1])
    err = (y - F.conv2d(x, w, padding=1, groups=3)).abs().max().item()
    assert err < 1e-4, err
    print("torch.ops.repkernels.depthwise_conv2d (_C, CPU tensors) matches F.conv2d: max error", err)
else:
    assert "+" not in version("repkernels"), "a wheel named for torch has no _C: " + str(_extension.LOAD_ERROR)
    print("pure-Python wheel (no _C):", _extension.LOAD_ERROR)
endef
export WHEEL_CHECK

clean:
	rm -rf $(S) build/cmake-py* build/lib.* build/bdist.* $(WHEEL_DIR)/repkernels-*.whl
	rm -f python/repkernels/_C.*.so
