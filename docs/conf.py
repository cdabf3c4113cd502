"""Sphinx configuration: the guide pages are Markdown (MyST), the API reference is
generated from the installed package's numpydoc docstrings."""
import importlib.metadata

project = "pybn"
author = "the pybn developers"
copyright = "the pybn developers, BSD 3-Clause"
release = importlib.metadata.version("pybn-kernels")
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]

autosummary_generate = True
autodoc_typehints = "none"          # numpydoc's Parameters sections carry the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

html_theme = "furo"
html_title = f"pybn {release}"
