"""The ``finegrain`` command: the top-level parser, the dispatch to a command and its errors. Each command's
options and handler live in the module of its name (``cli/train.py``, ...)."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys

import yaml

from ..errors import DataError
from . import (
    annotate,
    config,
    convert,
    demo,
    embed_text,
    eval,
    export,
    finetune,
    methods,
    models,
    predict,
    train,
    viz,
)

EPILOG = """examples:
  finegrain demo                                   # train + evaluate a tiny CLIP on built-in data (CPU, minutes)
  finegrain train --config demo train.steps=500 optim.lr=5e-4
  torchrun --nproc_per_node 2 -m finegrain train --config my.yaml
  finegrain train --config my.yaml --resume latest
  finegrain finetune --task seg --data /data/ade --pretrained runs/demo/best.pt   # UperNet on ADE20K
  finegrain eval --checkpoint runs/demo/best.pt --benchmark demo-retrieval,demo-boxes,demo-segmentation
  finegrain eval --model ViT-B-16 --pretrained openai --benchmark coco-panoptic --data-root /data/coco
  finegrain eval --table runs/clip runs/fineclip       # evaluations of several runs side by side
  finegrain predict --checkpoint runs/demo-finetune/ovd-fineclip/best.pt --images photos/ --classes "red star,cat" --out preds/ --draw
  finegrain export --checkpoint runs/demo/best.pt --output exported/   # open_clip local-dir:
  finegrain models --dense-only                    # model names with the dense API, and their pretrained tags
  finegrain annotate /data/images --output regions/ --proposer torchvision --weights DEFAULT --captioner blip2
  finegrain convert --captions cap.json --regions proposals.json --region-captions region_cap.json --output t.jsonl
  finegrain embed-text --config my.yaml --output text_cache/   # the frozen text tower's embeddings, once

errors in your input are one line, a bug in finegrain shows its traceback; FINEGRAIN_DEBUG=1: all tracebacks
"""
# the commands, in the order `finegrain --help` lists them: each module has add_parser(sub) and run(args) -> int
COMMANDS = {"demo": demo, "train": train, "finetune": finetune, "eval": eval, "predict": predict, "viz": viz,
            "annotate": annotate,
            "export": export, "config": config, "models": models, "methods": methods, "convert": convert,
            "embed-text": embed_text}
# what a command reports as one line "finegrain <command>: error: ...": bad input (a file, record, field, config
# key, checkpoint or option: DataError), a file that cannot be read or written (OSError: missing, permission
# denied, disk full), YAML syntax, a missing optional extra (ImportError naming the pip extra), and CUDA out of
# memory (user_error). Any other exception is a bug in finegrain: main() names it as one and lets it propagate
# with its traceback.
USER_ERRORS = (DataError, OSError, ImportError, yaml.YAMLError)


def user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix (:data:`USER_ERRORS`, or torch's CUDA out-of-memory error, looked
    up only when torch is already imported, as it is once a GPU ran out of memory) rather than a bug."""
    if isinstance(error, USER_ERRORS):
        return True
    out_of_memory = getattr(getattr(sys.modules.get("torch"), "cuda", None), "OutOfMemoryError", None)
    return out_of_memory is not None and isinstance(error, out_of_memory)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finegrain", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Fine-grained vision-language pretraining on open_clip models: train, evaluate, export.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def one_line(error: BaseException) -> str:
    """An exception's message on one line (a KeyError's without the quotes ``str`` adds; of an error a data
    loader worker raised, only the original message, not the worker's traceback that torch puts before it)."""
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        text = re.split(rf"\n(?:[\w.]+\.)?{type(error).__name__}: ", text)[-1]
    return " ".join(text.split()) or type(error).__name__


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; ``key=value`` overrides may stand on both sides of options
    (``train model.name=X --no-progress train.steps=1``), as with argparse's intermixed parsing: argparse
    takes the first run of them, and the later ones, returned unparsed, are appended here in order. An unknown
    option is an error of the (sub)command it was given to, with the closest of its options (``--confg``: did
    you mean --config?)."""
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        command = parser
        while True:  # down to the subcommand the arguments chose
            chosen = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
            name = getattr(args, chosen[0].dest, None) if chosen else None
            if name is None:
                break
            command = chosen[0].choices[name]
        options = [option for action in command._actions for option in action.option_strings]
        hints = []
        for arg in stray:
            close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1) if arg.startswith("-") else []
            hints.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
        command.error(f"unrecognized arguments: {' '.join(hints)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``; return the exit status: 0 done, 2 an error in the user's input (one line
    ``finegrain <command>: error: ...`` on stderr; argparse's usage errors also exit 2), 130 Ctrl-C, 141 a
    closed pipe. Any other exception is a bug: one line ``finegrain <command>: internal error (a bug in
    finegrain): <Type>: <message>; the traceback follows`` on stderr, then the exception propagates with its
    traceback (``python -m finegrain`` and the ``finegrain`` script then exit 1). ``FINEGRAIN_DEBUG=1``
    shows the traceback of every error."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.version:
        from .. import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    debug = bool(os.environ.get("FINEGRAIN_DEBUG"))
    try:
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"finegrain {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`finegrain models | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if not user_error(e):  # a bug in finegrain: say so in one line, then its traceback (exit status 1)
            print(f"finegrain {args.command}: internal error (a bug in finegrain): {type(e).__name__}: "
                  f"{one_line(e)}; the traceback follows", file=sys.stderr)
            raise
        if debug:
            raise
        print(f"finegrain {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
