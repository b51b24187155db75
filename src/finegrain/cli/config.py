"""``finegrain config``: the merged config after overrides, checked; or a recipe's value sources."""

from __future__ import annotations

import sys

from ..errors import DataError
from .common import add_config_args


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="print a config after overrides (checks keys and types)",
                       description="Print the merged config. Errors in keys, types or cross-field settings, "
                                   "and train.eval_tasks that data.val's records cannot serve, fail; data files "
                                   "that do not exist (yet) are warnings. --sources prints instead where each value "
                                   "of a recipe comes from (its source comments) as a Markdown table.")
    add_config_args(p)
    p.add_argument("--sources", action="store_true",
                   help="the recipe's values with their sources (release file:line, README command) and its "
                        "legend, as a Markdown table")
    p.add_argument("--base", metavar="RECIPE", help="with --sources: only the values or sources that differ from RECIPE")


def run(args) -> int:
    from ..config import ConfigError, config_to_yaml, load_config
    from ..objectives import complete_method_options
    from ..train.preflight import check_data_paths, check_eval_data

    if args.sources or args.base:
        from ..recipe_sources import markdown_table

        if not args.config or args.overrides:
            raise DataError("--sources shows a recipe file as written: give --config NAME (and no overrides)")
        print(markdown_table(args.config, args.base))
        return 0

    cfg = complete_method_options(load_config(args.config, args.overrides, args.data))
    try:
        check_data_paths(cfg)
    except ConfigError as e:
        missing = e
    else:
        missing = None
        check_eval_data(cfg)  # the held-out data is there: it must suit train.eval_tasks
    print(config_to_yaml(cfg), end="")
    if missing:
        print(f"finegrain config: warning: {missing}", file=sys.stderr)
    return 0
