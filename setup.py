"""The one thing pyproject.toml cannot say: the optional C extension (issue 6).

``freecall.srtp._hop`` runs the media bridge's secure per-packet hop in C. It is optional:
without a compiler ``pip install`` still succeeds and the bridge runs its Python handlers.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "freecall.srtp._hop",
            sources=["src/freecall/srtp/_hop.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
