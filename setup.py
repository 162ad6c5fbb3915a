"""Build hook for the one compiled part: the GIL sampler's optional hot loop in C.

Everything else is in pyproject.toml. The extension is optional: without a C compiler or
Python's headers the build goes on without it, and exporter/sampler.py runs the same loop
in Python (tests/test_hotloop.py installs both ways).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("exporter._hotloop", ["exporter/_hotloop.c"], optional=True)])
