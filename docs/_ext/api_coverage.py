"""Fails the docs build when a public symbol has no docstring or no entry in the API reference.

The public symbols of a module in `api_coverage_modules` are the names in its `__all__` and the
functions and classes it defines whose names do not start with "_", with the public methods and
properties of those classes. Each must be described by an autodoc entry with a non-empty body:
its docstring, or for a constant, its `#:` comment or the directive's own text. A missing one is
a warning, which `-W` turns into an error.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from typing import Any

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

logger = logging.getLogger(__name__)


def _is_public_member(name: str, value: Any) -> bool:
    if name.startswith("_"):
        return False
    return inspect.isfunction(value) or isinstance(value, (property, classmethod, staticmethod))


def public_symbols(module_name: str) -> Iterator[tuple[str, Any]]:
    """(dotted name in the module, object) of every public symbol of the module."""
    module = importlib.import_module(module_name)
    names = list(getattr(module, "__all__", []))
    names += [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module_name
        and name not in names
    ]
    for name in names:
        value = getattr(module, name)
        yield name, value
        if inspect.isclass(value) and value.__module__.startswith(module_name.split(".")[0]):
            for member, attribute in vars(value).items():
                if _is_public_member(member, attribute):
                    yield f"{name}.{member}", attribute


def _home_names(module_name: str, name: str, value: Any) -> set[str]:
    """Where the entry may be: in the module, or in the module that defines the object."""
    names = {f"{module_name}.{name}"}
    home = getattr(value, "__module__", None)
    if home and (inspect.isfunction(value) or inspect.isclass(value)):
        names.add(f"{home}.{value.__qualname__}")
    return names


def _record_descriptions(app: Sphinx, doctree: nodes.document) -> None:
    """Notes every Python object the page describes, and whether its body says anything."""
    described: dict[str, bool] = {}
    app.env.api_coverage_described[app.env.docname] = described  # type: ignore[attr-defined]
    for desc in doctree.findall(addnodes.desc):
        if desc.get("domain") != "py":
            continue
        content = next(iter(desc.findall(addnodes.desc_content)), None)
        # A class's own text, not that of the members described inside it.
        own = (
            []
            if content is None
            else [c for c in content.children if not isinstance(c, addnodes.desc)]
        )
        has_text = any(child.astext().strip() for child in own)
        for signature in desc.findall(addnodes.desc_signature):
            module, fullname = signature.get("module"), signature.get("fullname")
            if module and fullname:
                key = f"{module}.{fullname}"
                described[key] = described.get(key, False) or has_text


def _init_env(app: Sphinx, env: BuildEnvironment, docnames: Any) -> None:
    if not hasattr(env, "api_coverage_described"):
        env.api_coverage_described = {}  # type: ignore[attr-defined]  # {docname: {name: bool}}


def _purge(app: Sphinx, env: BuildEnvironment, docname: str) -> None:
    getattr(env, "api_coverage_described", {}).pop(docname, None)


def _check(app: Sphinx, env: BuildEnvironment) -> None:
    described: dict[str, bool] = {}
    for page in env.api_coverage_described.values():  # type: ignore[attr-defined]
        for key, has_text in page.items():
            described[key] = described.get(key, False) or has_text
    for module_name in app.config.api_coverage_modules:
        for name, value in public_symbols(module_name):
            where = _home_names(module_name, name, value)
            if not any(key in described for key in where):
                why = "" if (getattr(value, "__doc__", None) or "").strip() else " (no docstring)"
                missing = f"{module_name}.{name} is not in the API reference{why}"
                logger.warning(f"api_coverage: {missing}")
            elif not any(described.get(key) for key in where):
                logger.warning(f"api_coverage: {module_name}.{name} has no docstring")


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("api_coverage_modules", [], "env")
    app.connect("env-before-read-docs", _init_env)
    app.connect("env-purge-doc", _purge)
    app.connect("doctree-read", _record_descriptions)
    app.connect("env-check-consistency", _check)
    return {"version": "1", "parallel_read_safe": False, "parallel_write_safe": True}
