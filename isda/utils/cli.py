"""Command lines that end with Detectron2's ``KEY VALUE`` overrides (an argparse REMAINDER).

argparse gives everything after the first ``KEY`` to the overrides, so a flag typed after them
(``train_net.py --config-file c.yaml SOLVER.MAX_ITER 100 --resume``) became part of the list and
failed later with "Override list has odd length". :func:`parse_args_anywhere` accepts the
program's own options anywhere on the line.
"""
import argparse
import re
import sys

__all__ = ["parse_args_anywhere"]

_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+")  # a config key: MODEL.ISDA.NUM_CLASSES


def _remainder_action(parser):
    for action in parser._actions:
        if action.nargs == argparse.REMAINDER:
            return action
    return None


def parse_args_anywhere(parser, argv=None):
    """``parser.parse_args(argv)``, with the parser's own options found among the trailing
    ``KEY VALUE`` overrides moved before them (with their values)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    remainder = _remainder_action(parser)
    if remainder is None:
        return args
    opts = list(getattr(args, remainder.dest) or [])
    moved, kept, i = [], [], 0
    while i < len(opts):
        token = opts[i]
        name = token.split("=", 1)[0]
        action = parser._option_string_actions.get(name) if token.startswith("--") else None
        if action is None or action is remainder:
            kept.append(token)
            i += 1
            continue
        if "=" in token or action.nargs == 0:
            count = 0
        elif isinstance(action.nargs, int):
            count = action.nargs
        elif action.nargs is None or action.nargs == argparse.OPTIONAL:
            count = 1
        else:  # "+" / "*": its values run up to the next option or config KEY
            count = 0
            while i + 1 + count < len(opts) and not opts[i + 1 + count].startswith("--") \
                    and not _KEY.fullmatch(opts[i + 1 + count]):
                count += 1
        moved += opts[i:i + 1 + count]
        i += 1 + count
    if not moved:
        return args
    prefix = argv[:len(argv) - len(opts)]
    if remainder.option_strings and prefix and prefix[-1] in remainder.option_strings:
        new_argv = prefix[:-1] + moved + prefix[-1:] + kept
    else:
        new_argv = prefix + moved + kept
    return parser.parse_args(new_argv)
