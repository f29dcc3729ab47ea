"""Build gfm_fast and its C++/CUDA extension gfm_fast._C.

The C++ CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always compiled. csrc/cuda/*.cu is added
(CppExtension -> CUDAExtension, -DWITH_CUDA) when a CUDA toolkit is found and torch is a CUDA
build, GPU or not, so CUDA compile errors surface at build time; FORCE_CUDA=1 insists on it and
FORCE_CUDA=0 skips it. DEBUG=1 builds with -O0 -g; NVCC_FLAGS adds nvcc flags.
Install with `pip install --no-build-isolation -e .` so that the extension is built against the
torch already installed (see README).
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(home):
    return bool(home) and all(os.path.exists(os.path.join(home, *part)) for part in
                              (("bin", "nvcc"), ("include", "cuda_runtime.h")))


def _cuda_home():
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH, /usr/local/cuda, or the one nvcc on PATH belongs to.

    A candidate must hold both bin/nvcc and the headers: an nvcc wrapper script in /usr/local/bin
    would otherwise make /usr/local look like a toolkit.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    return next((home for home in candidates if _is_toolkit(home)), None)


def _pip_cuda_includes(cuda_home):
    """torch's CUDA headers include cuSPARSE/cuBLAS/cuSOLVER headers that a bare toolkit may lack; the
    nvidia-*-cu* wheels torch depends on ship them (same CUDA major as torch). Only used when needed."""
    import torch

    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")) or not torch.version.cuda:
        return []
    try:
        import nvidia
    except ImportError:
        return []
    major = torch.version.cuda.split(".")[0]
    found = []
    for root in nvidia.__path__:
        for include in sorted(glob.glob(os.path.join(root, "*", "include"))):
            name = os.path.basename(os.path.dirname(include))
            if os.path.exists(os.path.join(include, "cusparse.h")) and name in (f"cu{major}", "cusparse"):
                found.append(include)
    return found


def _extensions():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        print("gfm_fast build: no C++ sources under csrc/, building no extension")
        return [], {}
    debug = os.environ.get("DEBUG", "0") == "1"
    force_cuda = os.environ.get("FORCE_CUDA")
    cuda_home = _cuda_home()
    with_cuda = torch.version.cuda is not None and cuda_home is not None and force_cuda != "0"
    if force_cuda == "1" and not with_cuda:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit (nvcc) was found or torch is not a CUDA build; "
                           "set CUDA_HOME to the toolkit or install a CUDA build of torch")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # torch >= 2.10 headers need C++20; -Wno-psabi: our always-inlined SIMD helpers pass vectors by value
    cxx = opt + ["-fopenmp", "-std=c++20", "-Wno-psabi"]
    extra = {"cxx": cxx}
    define = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    ext_cls = CppExtension
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if with_cuda and cuda_sources:
        os.environ["CUDA_HOME"] = cuda_home  # torch's own guess is wrong on some machines
        import torch.utils.cpp_extension as cpp_ext

        cpp_ext.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # A100, H100 when no GPU can be queried
        sources += cuda_sources
        include_dirs += _pip_cuda_includes(cuda_home)
        ext_cls = CUDAExtension
        define.append(("WITH_CUDA", None))
        extra["nvcc"] = opt + ["-std=c++20", "--expt-relaxed-constexpr"] + os.environ.get("NVCC_FLAGS", "").split()
    print(f"gfm_fast build: torch {torch.__version__}, cuda toolkit {cuda_home}, with_cuda={ext_cls is CUDAExtension}, "
          f"debug={debug}, arch={os.environ.get('TORCH_CUDA_ARCH_LIST', 'default')}, sources={len(sources)}")
    ext = ext_cls("gfm_fast._C", sources, include_dirs=include_dirs, define_macros=define,
                  extra_compile_args=extra, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    name="gfm_fast",
    version="0.1.0",
    description="Fast GFM (geospatial foundation model) continual pretraining and feature extraction",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["gfm_fast", "gfm_fast.*"]) + ["gfm_fast.kernels"],
    package_dir={"gfm_fast.kernels": "kernels"},
    include_package_data=True,
    package_data={"gfm_fast": ["data/sample/*", "data/sample/**/*", "../configs/*.yaml"]},
    install_requires=["torch>=2.4", "timm>=1.0.9", "numpy", "safetensors", "pyyaml", "tqdm", "pillow", "simplejpeg",
                      "tifffile", "imagecodecs", "webdataset>=0.2.90", "deepspeed>=0.15", "tensorboard", "pybind11",
                      "pyarrow>=16"],
    extras_require={"test": ["pytest", "pytest-xdist"], "bench": ["torchvision"],
                    "export": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],  # python -m gfm_fast.export
                    "terratorch": ["terratorch>=1.2"]},  # docs/terratorch_segmentation.yaml
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["gfm-train=gfm_fast.training:main"]},
)
