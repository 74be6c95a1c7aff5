"""Sphinx configuration of diffopt's API site: one page per module, generated from the docstrings
(autodoc + napoleon for the Google-style sections), with the README as the front page.

Build (the command the README gives; warnings are errors)::

    pip install -e '.[docs]' && sphinx-build -W -b html docs docs/_build
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys

sys.path.insert(0, os.path.abspath(".."))

import diffopt  # noqa: E402

project = "diffopt"
author = "diffopt contributors"
release = diffopt.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

autosummary_generate = True
autosummary_imported_members = False
# "ignore-module-all": a module's page documents what the module defines, not what its __all__ re-exports
# from submodules (those have their own pages; documenting them twice is a duplicate description)
autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource",
                           "ignore-module-all": True}
autodoc_typehints = "description"
autodoc_mock_imports: list[str] = []
napoleon_google_docstring = True
napoleon_numpy_docstring = False
myst_heading_anchors = 3
# Names are re-exported on purpose (diffopt.unroll.InnerLoop is diffopt.unroll.engine.InnerLoop): a
# cross-reference finding both is resolved to the first, correctly; that is not worth a warning.
suppress_warnings = ["ref.python"]



def _modules() -> list[str]:
    """Every module of the package, except the ``__main__`` entry points (importing one runs the CLI)."""
    names = ["diffopt"]
    for info in pkgutil.walk_packages(diffopt.__path__, "diffopt."):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            importlib.import_module(info.name)
            names.append(info.name)
    return names


def _write_api_page() -> None:
    """``api.rst``: the autosummary of every module, one generated page each (``api/<module>.rst``)."""
    lines = ["API reference", "=============", "", "One page per module, generated from the docstrings.", "",
             ".. autosummary::", "   :toctree: api", ""]
    lines += [f"   {name}" for name in _modules()]
    path = os.path.join(os.path.dirname(__file__), "api.rst")
    text = "\n".join(lines) + "\n"
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as stream:
            stream.write(text)


_write_api_page()

html_theme = "alabaster"
html_static_path: list[str] = []
