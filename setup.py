"""The one thing pyproject.toml cannot say with the setuptools Debian 12 ships (66): the compiled Maglev fill.

edge_lb/dataplane/_maglevfill.c is a CPython extension (why: see the top of that file). `pip install -e .`
(scripts/setup.sh) builds it in place; without it edge_lb.dataplane.maglev runs its pure-Python fill.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "edge_lb.dataplane._maglevfill",
            sources=["edge_lb/dataplane/_maglevfill.c"],
            extra_compile_args=["-Wall", "-Wextra", "-std=c11"],
        )
    ]
)
