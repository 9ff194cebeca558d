"""Build pgguard's optional native relay (pgguard/_relay.c); the rest is in pyproject.toml.

``optional=True``: on a machine without a C compiler (or not Linux) the build of the
extension fails quietly and pgguard installs without it, relaying in Python.
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):  # epoll and eventfd
    ext_modules.append(
        Extension(
            "pgguard._relay",
            sources=["pgguard/_relay.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-parameter"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
