"""The documentation site builds with no warning, runs its tutorials, and documents every public
symbol; its coverage check fails a build that leaves one out."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import api_coverage  # noqa: E402


def sphinx_build(source: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html"]
    return subprocess.run(
        [*command, *options, str(source), str(out)], capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_the_site_builds_runs_its_tutorials_and_documents_every_public_symbol(tmp_path):
    """`make docs` in a temporary folder: -W turns any warning, the coverage check's included,
    into a failure, and myst-nb fails the build on an error in a tutorial."""
    build = sphinx_build(DOCS, tmp_path / "html")
    assert build.returncode == 0, build.stderr[-5000:]
    html = tmp_path / "html"

    # The tutorials ran: their pages hold the outputs of their cells.
    loss_page = (html / "tutorials" / "loss.html").read_text()
    assert "S-D loss: " in loss_page and "step 49: loss" in loss_page
    trainer_page = (html / "tutorials" / "training.html").read_text()
    assert re.search(r"linear_eval: mAP 0\.\d{3}", trainer_page)
    assert "results.json" in trainer_page

    # Every public symbol has an entry (an HTML anchor named by its dotted name).
    anchors = set()
    for page in (html / "api").glob("*.html"):
        anchors |= set(re.findall(r'id="(sdjax\.[\w.]+)"', page.read_text()))
    for module in api_coverage_modules():
        for name, value in api_coverage.public_symbols(module):
            homes = {f"{module}.{name}", f"{getattr(value, '__module__', '')}.{name}"}
            assert homes & anchors, f"{module}.{name} has no entry in the API reference"

    # The figures of experiments/results were copied into the site.
    figures = {path.name for path in (html / "_images").iterdir()}
    assert {"bench_loss.png", "bench_train.png", "datasets.png", "tsne.png"} <= figures


def api_coverage_modules() -> list[str]:
    text = (DOCS / "conf.py").read_text()
    listing = re.search(r"api_coverage_modules = \[(.*?)\]", text, re.S).group(1)
    modules = re.findall(r'"([\w.]+)"', listing)
    assert "sdjax.losses" in modules and "sdjax.train" in modules
    return modules


def a_project(tmp_path: Path, module_source: str) -> Path:
    """A minimal Sphinx project that documents one module with the coverage check on."""
    source = tmp_path / "src"
    source.mkdir()
    (tmp_path / "covered_module.py").write_text(textwrap.dedent(module_source))
    (source / "conf.py").write_text(
        textwrap.dedent(f"""\
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {str(DOCS / "_ext")!r}]
        extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "api_coverage"]
        api_coverage_modules = ["covered_module"]
        """)
    )
    (source / "index.rst").write_text("API\n===\n\n.. automodule:: covered_module\n   :members:\n")
    return source


DOCUMENTED = '''
    """A module."""

    def documented(x):
        """Returns x."""
        return x


    class Documented:
        """A class."""

        def method(self):
            """A method."""
'''


def test_the_coverage_check_passes_a_module_whose_public_symbols_all_have_docstrings(tmp_path):
    build = sphinx_build(a_project(tmp_path, DOCUMENTED), tmp_path / "html")
    assert build.returncode == 0, build.stderr


def test_the_coverage_check_fails_the_build_on_each_public_symbol_without_a_docstring(tmp_path):
    source = (
        DOCUMENTED
        + '''

    def undocumented(x):
        return x


    def _private(x):
        return x


    class Bare:
        def method(self):
            """Documented, in an undocumented class."""

        def bare_method(self):
            pass
'''
    )
    build = sphinx_build(a_project(tmp_path, source), tmp_path / "html")
    assert build.returncode != 0
    flagged = set(re.findall(r"api_coverage: (covered_module\.[\w.]+)", build.stderr))
    assert flagged == {
        "covered_module.undocumented",
        "covered_module.Bare",
        "covered_module.Bare.method",  # autodoc leaves out the members of a class it leaves out
        "covered_module.Bare.bare_method",
    }, build.stderr
