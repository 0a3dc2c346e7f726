import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from flask_pymacaron_async import __version__  # noqa: E402

project = "flask-pymacaron-async"
author = "flask-pymacaron-async developers"
copyright = "2026, flask-pymacaron-async developers"
release = __version__
version = ".".join(__version__.split(".")[:2])
extensions = ["sphinx.ext.autodoc"]
html_theme = "furo"
html_title = f"flask-pymacaron-async {release}"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# No intersphinx: the build must not need the network (make test runs it with -W).
nitpicky = False
