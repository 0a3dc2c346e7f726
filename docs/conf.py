import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "flask-pymacaron-async"
author = "flask-pymacaron-async developers"
copyright = "2026, flask-pymacaron-async developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.intersphinx"]
html_theme = "furo"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
intersphinx_mapping = {}
nitpicky = False
