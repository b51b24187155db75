"""Methods and loss terms declared as entry points of the groups ``finegrain.methods`` and
``finegrain.terms`` (finegrain's own in its ``pyproject.toml``, and any installed package's): their names
are known without importing them, and one from another package loads the first time a config names it.

A package adds a method and a term with, in its ``pyproject.toml``::

    [project.entry-points."finegrain.methods"]
    my_method = "my_package.methods:MyMethod"     # a finegrain.objectives.Method subclass

    [project.entry-points."finegrain.terms"]
    my_term = "my_package.terms:MyTerm"           # a finegrain.objectives.Term subclass

(docs/methods.md shows a complete example package.)
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

METHOD_GROUP = "finegrain.methods"
TERM_GROUP = "finegrain.terms"


def method_entry_points() -> dict[str, EntryPoint]:
    """``{name: entry point}`` of every installed ``finegrain.methods`` entry point."""
    return {ep.name: ep for ep in entry_points(group=METHOD_GROUP)}


def term_entry_points() -> dict[str, EntryPoint]:
    """``{name: entry point}`` of every installed ``finegrain.terms`` entry point."""
    return {ep.name: ep for ep in entry_points(group=TERM_GROUP)}


def registrar(table: dict[str, type], kind: str, doc: str):
    """``register(name)``, a class decorator putting a class in ``table`` under ``name`` (and naming it
    ``cls.<kind>_name``); a name registered twice is an error."""

    def register(name: str):
        def wrap(cls: type) -> type:
            if name in table:
                raise ValueError(f"{kind} {name!r} is registered twice")
            table[name] = cls
            setattr(cls, f"{kind}_name", name)
            return cls

        return wrap

    register.__doc__ = doc
    return register
