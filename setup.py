"""Build script. The package itself is pure Python (metadata lives in pyproject.toml); this
file adds the optional compiled extension `labpal_fast._C` built from csrc/, and ships csrc/
inside the package (labpal_fast/_csrc) so that it can be compiled later.

- `pip install <clone or sdist>` (pip's default build isolation hides the installed torch, and
  asking for torch as a build requirement would download a second, CUDA build of it): the
  package installs without the extension, which is compiled on first use against the torch
  actually installed and cached (labpal_fast/ops/ext_build.py).
- `pip install --no-build-isolation ...` (torch importable here): the extension is built now.
- `LABPAL_FAST_NO_EXT=1` skips the extension; `LABPAL_FAST_NO_CUDA=1` builds the CPU kernels only.
- CUDA kernels are built when torch is a CUDA build and a CUDA toolkit (nvcc) is found; with no
  GPU to detect the architectures from, for TORCH_CUDA_ARCH_LIST (default below).
- A build that fails prints why and leaves the pure-Python package working; the first LABPAL
  with backend="auto" then says which backend it uses and why.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def _flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _say(message):
    print(f"labpal_fast setup: {message}", file=sys.stderr)


# the architectures CI's gpu-verify compiles for, and PTX for newer ones
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


class BuildPyWithSources(build_py):
    """Copies csrc/ into the built package as labpal_fast/_csrc (compiled on first use when
    the extension is not built here)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install finds csrc/ itself
            return
        for path in sorted(Path("csrc").rglob("*")):
            if path.suffix in (".cpp", ".h", ".cu"):
                target = Path(self.build_lib) / "labpal_fast" / "_csrc" / path.relative_to("csrc")
                self.mkpath(str(target.parent))
                self.copy_file(str(path), str(target))


def _extension_kwargs():
    if _flag("LABPAL_FAST_NO_EXT"):
        _say("LABPAL_FAST_NO_EXT is set: installing without the compiled extension")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # torch missing, e.g. under pip's build isolation
        _say(f"torch is not importable at build time ({exc}): installing without the compiled "
             "extension; it is compiled on first use against the installed torch (or now, with "
             "`pip install --no-build-isolation`)")
        return {}

    # OpenMP: the backend of torch's at::parallel_for. No -march (portable). -fno-wrapv undoes
    # Python's -fwrapv, which kept GCC from vectorizing the fused loops (3x slower).
    cxx = ["-O3", "-fno-wrapv", "-fopenmp"]
    sources = ["csrc/labpal_ops.cpp"]
    depends = ["csrc/common.h", "csrc/cuda/kernels.h"]
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    use_cuda = bool(torch.version.cuda) and nvcc is not None and os.path.exists(nvcc) \
        and not _flag("LABPAL_FAST_NO_CUDA")
    if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch reads the architectures off the visible GPUs and fails on none
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        _say(f"no GPU visible: CUDA kernels for TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCHS}")
    if use_cuda:
        sources += ["csrc/cuda/kernels.cu", "csrc/cuda/cuda_ops.cpp"]
        ext = cpp_extension.CUDAExtension(
            "labpal_fast._C", sources,
            extra_compile_args={"cxx": cxx + ["-DLABPAL_WITH_CUDA"], "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"], depends=depends)
    else:
        ext = cpp_extension.CppExtension("labpal_fast._C", sources,
                                         extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"], depends=depends)
    _say(f"building labpal_fast._C ({'CPU + CUDA' if use_cuda else 'CPU'} kernels)")

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """BuildExtension that warns and goes on when the extension does not build."""

        failed = ()

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # compiler missing, compile or link error
                self.failed = tuple(self.failed) + (extension.name,)
                _say(f"building {extension.name} failed ({exc}); installing without it: "
                     "labpal_fast falls back to the eager backend")

        def _built(self):
            return [e for e in self.extensions if e.name not in self.failed]

        def copy_extensions_to_source(self):
            kept, self.extensions = self.extensions, self._built()
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = kept

        def get_outputs(self):
            kept, self.extensions = self.extensions, self._built()
            try:
                return super().get_outputs()
            finally:
                self.extensions = kept

        def get_output_mapping(self):
            kept, self.extensions = self.extensions, self._built()
            try:
                return super().get_output_mapping()
            finally:
                self.extensions = kept

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _say("no C++ compiler found: installing without the compiled extension")
        return {}
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt.with_options(
        use_ninja=shutil.which("ninja") is not None)}}


kwargs = _extension_kwargs()
setup(**dict(kwargs, cmdclass=dict(kwargs.get("cmdclass", {}), build_py=BuildPyWithSources)))
