"""Methods declared as entry points of the group ``finegrain.methods`` (finegrain's own in its
``pyproject.toml``, and any installed package's): their names are known without importing them, and a
method from another package loads the first time a config names it.

A package adds a method with, in its ``pyproject.toml``::

    [project.entry-points."finegrain.methods"]
    my_method = "my_package.methods:MyMethod"     # a finegrain.objectives.Method subclass
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

METHOD_GROUP = "finegrain.methods"


def method_entry_points() -> dict[str, EntryPoint]:
    """``{name: entry point}`` of every installed ``finegrain.methods`` entry point."""
    return {ep.name: ep for ep in entry_points(group=METHOD_GROUP)}
