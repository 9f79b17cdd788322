"""Build script. The package itself is pure Python (metadata lives in pyproject.toml); this
file adds the optional compiled extension `labpal_fast._C` built from csrc/.

- torch must be importable at build time: install with `pip install --no-build-isolation`.
  Without torch the build fails and says so (pip's default build isolation hides torch, and it
  hides a setup.py's warnings too: a skipped extension would go unnoticed).
- `LABPAL_FAST_NO_EXT=1` skips the extension; `LABPAL_FAST_NO_CUDA=1` builds the CPU kernels only.
- CUDA kernels are built when torch is a CUDA build and a CUDA toolkit (nvcc) is found.
- A build that fails prints why and leaves the pure-Python package (the eager backend) working.
"""
import os
import shutil
import sys

from setuptools import setup


def _flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _say(message):
    print(f"labpal_fast setup: {message}", file=sys.stderr)


def _fail_build_ext(message):
    """setup() arguments whose build_ext fails with `message`. Only building fails: an sdist or
    the metadata (what pip asks for first) need no torch."""
    from setuptools import Extension
    from setuptools.command.build_ext import build_ext
    from setuptools.errors import SetupError

    class NoTorch(build_ext):
        def run(self):
            raise SetupError(f"labpal_fast setup: {message}")

    return {"ext_modules": [Extension("labpal_fast._C", ["csrc/labpal_ops.cpp"])],
            "cmdclass": {"build_ext": NoTorch}}


def _extension_kwargs():
    if _flag("LABPAL_FAST_NO_EXT"):
        _say("LABPAL_FAST_NO_EXT is set: installing without the compiled extension")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # torch missing, e.g. under pip's build isolation
        return _fail_build_ext(f"torch is not importable at build time ({exc}): pip hides it under "
                               "build isolation; install with `pip install --no-build-isolation "
                               "labpal-fast` (torch installed first), or set LABPAL_FAST_NO_EXT=1 "
                               "for a pure-Python install")

    # OpenMP: the backend of torch's at::parallel_for. No -march (portable). -fno-wrapv undoes
    # Python's -fwrapv, which kept GCC from vectorizing the fused loops (3x slower).
    cxx = ["-O3", "-fno-wrapv", "-fopenmp"]
    sources = ["csrc/labpal_ops.cpp"]
    depends = ["csrc/common.h", "csrc/cuda/kernels.h"]
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    use_cuda = bool(torch.version.cuda) and nvcc is not None and os.path.exists(nvcc) \
        and not _flag("LABPAL_FAST_NO_CUDA")
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


setup(**_extension_kwargs())
