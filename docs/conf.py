"""Sphinx configuration of the documentation site: `make docs` builds it into docs/_build/html.

Offline: no intersphinx, nothing fetched. Tutorials are MyST notebooks that myst-nb executes on
every build; an error in one fails the build, and `-W` makes every warning an error.
"""

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # autodoc imports this checkout's sdjax
sys.path.insert(0, str(Path(__file__).parent / "_ext"))
# The notebook kernels are child processes: they import this checkout's sdjax too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

import sdjax  # noqa: E402

project = "sdjax"
author = "the sdjax authors"
copyright = "the sdjax authors"
release = version = sdjax.__version__

extensions = [
    "myst_nb",  # MyST Markdown pages and executed MyST notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "api_coverage",
]
source_suffix = {".md": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_ext", "jupyter_execute", "**.ipynb_checkpoints"]

# MyST: GitHub-style heading anchors, so `[..](SPEC.md#inputs)` works on GitHub and here.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]

# myst-nb: run every tutorial on every build, fail on any error.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_timeout = 600
nb_output_stderr = "remove"  # absl/TensorFlow start-up chatter; errors still fail the build

# API reference: Google-style docstrings (Args/Returns/Raises), signatures with their types.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Docstrings are written for `help()` and GitHub: `name` is code, |y_a ∩ y_b| is a set's size
# and y_b \ y_a a set difference (in reStructuredText, |...| would be a substitution and a
# backslash an escape).
default_role = "code"


def _escape_math(app, what, name, obj, options, lines):
    for i, line in enumerate(lines):
        parts = re.split(r"(``.*?``|`[^`]*`)", line)  # leave code alone
        lines[i] = "".join(
            part if part.startswith("`") else part.replace("\\", "\\\\").replace("|", "\\|")
            for part in parts
        )


def setup(app):
    app.connect("autodoc-process-docstring", _escape_math, priority=400)  # before napoleon


# api_coverage: every public symbol of these modules has a docstring and an entry in the API
# reference, or the build fails.
api_coverage_modules = [
    "sdjax.losses",
    "sdjax.config_lib",
    "sdjax.train",
    "sdjax.recipe",
    "sdjax.datasets.registry",
    "sdjax.datasets.sources",
    "sdjax.input_pipeline",
    "sdjax.modalities",
    "sdjax.metrics",
    "sdjax.evaluate",
    "sdjax.evaluators",
    "sdjax.evaluators.common",
    "sdjax.evaluators.heldout_loss",
    "sdjax.evaluators.linear_probe",
    "sdjax.evaluators.joint_classifier",
    "sdjax.evaluators.random_init_probe",
    "sdjax.evaluators.save_test_outputs",
    "sdjax.evaluators.long_tail",
    "sdjax.reporting",
]

html_theme = "sphinx_book_theme"
html_title = f"sdjax {release}"
html_theme_options = {"show_toc_level": 2}
