"""Build of xdit_ops.

Two native modules, each built only where it can be:

* ``xdit_ops._C``: the CUDA kernels for every supported arch (``TORCH_CUDA_ARCH_LIST``).
* ``xdit_ops._C_sm90``: Hopper-only kernels (wgmma, TMA), compiled for ``sm_90a`` alone.

Without a CUDA build of torch or without nvcc, only the Python package is installed: the
references and Triton paths work and ``import xdit_ops`` never needs a compiled module. The
build never asks whether a GPU is present (build hosts and CI have none).

Environment switches (see README): ``XDIT_OPS_SKIP_CUDA=1`` installs pure Python;
``XDIT_OPS_SKIP_SM90=1`` skips the Hopper module; ``MAX_JOBS`` caps parallel compiles.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[xdit_ops build] {msg}", file=sys.stderr)


def _find_cuda_home() -> str | None:
    """CUDA_HOME if set, else the toolkit folder holding nvcc (with lib64), else None."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        return home
    return None


def _nvidia_include_dirs() -> list[str]:
    """Header folders that pip's CUDA wheels install (cusparse.h, nccl.h, ...).

    torch's ATen/cuda headers include cusparse.h and friends, which a bare toolkit may lack;
    the CUDA build of torch pulls them in as wheels under site-packages/nvidia/*/include.
    """
    dirs: list[str] = []
    try:
        import nvidia  # namespace package from the nvidia-* wheels

        for base in list(getattr(nvidia, "__path__", [])):
            dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    except ImportError:
        pass
    return [d for d in dirs if os.path.isdir(d)]


def _cutlass_include_dirs() -> list[str]:
    """CUTLASS/CuTe headers from the nvidia-cutlass wheel (a build requirement)."""
    try:
        import cutlass_library  # noqa: F401  (from nvidia-cutlass)

        base = Path(cutlass_library.__file__).resolve().parent / "source"
        dirs = [base / "include", base / "tools" / "util" / "include"]
        return [str(d) for d in dirs if d.is_dir()]
    except ImportError:
        return []


def _arch_list() -> list[str]:
    raw = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a")
    return [a for a in raw.replace(",", ";").replace(" ", ";").split(";") if a]


def _wants_sm90(arches: list[str]) -> bool:
    return any(a.split("+")[0] in ("9.0", "9.0a") for a in arches)


def build_extensions():
    if os.environ.get("XDIT_OPS_SKIP_CUDA") == "1":
        log("XDIT_OPS_SKIP_CUDA=1: installing pure Python (no native modules)")
        return [], {}
    try:
        import torch
    except ImportError:
        log("torch is not importable at build time: installing pure Python. "
            "Install torch first and build with --no-build-isolation to get the CUDA modules.")
        return [], {}
    if torch.version.cuda is None and torch.version.hip is None:
        log(f"torch {torch.__version__} is a CPU build: skipping the CUDA modules")
        return [], {}
    cuda_home = _find_cuda_home()
    if torch.version.cuda is not None and (cuda_home is None or not os.path.exists(
            os.path.join(cuda_home, "bin", "nvcc"))):
        log("nvcc not found (set CUDA_HOME): skipping the CUDA modules")
        return [], {}
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    arches = _arch_list()

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    include_dirs = [str(ROOT / "csrc" / "include"), str(ROOT / "csrc" / "cuda")]
    include_dirs += _nvidia_include_dirs()
    cxx_flags = ["-O3"]
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo",
                  "--expt-relaxed-constexpr", "-Xptxas=-v" if os.environ.get(
                      "XDIT_OPS_PTXAS_VERBOSE") == "1" else "-Xptxas=-O3"]
    is_rocm = torch.version.hip is not None
    if is_rocm:
        cxx_flags.append("-DUSE_ROCM")

    exts = []
    srcs = sorted(glob.glob("csrc/kernels/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    exts.append(CUDAExtension(
        name="xdit_ops._C",
        sources=srcs,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    ))
    log(f"building xdit_ops._C for TORCH_CUDA_ARCH_LIST={';'.join(arches)} "
        f"({len(srcs)} sources, CUDA_HOME={cuda_home})")

    sm90_srcs = sorted(glob.glob("csrc/cuda/sm90/*.cu")) + sorted(glob.glob("csrc/cuda/sm90/*.cpp"))
    skip = None
    if os.environ.get("XDIT_OPS_SKIP_SM90") == "1":
        skip = "XDIT_OPS_SKIP_SM90=1"
    elif is_rocm:
        skip = "ROCm build (Hopper-only kernels are CUDA-only)"
    elif not _wants_sm90(arches):
        skip = f"TORCH_CUDA_ARCH_LIST={';'.join(arches)} has no 9.0/9.0a"
    elif not any(s.endswith(".cu") for s in sm90_srcs):
        skip = "no sources under csrc/cuda/sm90"
    elif not _cutlass_include_dirs():
        skip = "nvidia-cutlass (CUTLASS/CuTe headers) is not installed"
    if skip:
        log(f"skipping xdit_ops._C_sm90: {skip}")
    else:
        sm90_nvcc = [f for f in nvcc_flags] + [
            "-gencode=arch=compute_90a,code=sm_90a", "-DXDIT_OPS_SM90"]
        exts.append(CUDAExtension(
            name="xdit_ops._C_sm90",
            sources=sm90_srcs,
            include_dirs=include_dirs + _cutlass_include_dirs(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": sm90_nvcc},
        ))
        log(f"building xdit_ops._C_sm90 for sm_90a ({len(sm90_srcs)} sources)")
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_extensions()

setup(
    packages=find_packages(include=["xdit_ops", "xdit_ops.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
