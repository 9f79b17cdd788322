"""Build script. The package itself is pure Python (metadata lives in pyproject.toml);
this file exists so the compiled extension in csrc/ can be added to the build."""
from setuptools import setup

setup()
