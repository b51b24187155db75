"""``finegrain methods``: training methods and loss terms, finegrain's and those packages declare."""

from __future__ import annotations


def add_parser(sub) -> None:
    sub.add_parser("methods", help="list training methods and loss terms (finegrain's and those installed packages "
                                   "declare)")


def run(args) -> int:
    from ..plugins import method_entry_points, term_entry_points

    methods, terms = sorted(method_entry_points()), sorted(term_entry_points())  # declared: nothing is imported
    if not methods or not terms:  # finegrain run from a source tree without its installed metadata
        from ..objectives import list_methods, list_terms

        methods, terms = list_methods(), list_terms()
    print("\n".join(methods))
    print("\nterms (a method of its own, or joined to methods and terms with +, e.g. fineclip+detailclip):")
    print("\n".join(f"  {name}" for name in terms))
    return 0
