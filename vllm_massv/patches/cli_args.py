"""`--speculative-config` also accepts the path of a JSON file (`--speculative-config
massv.json`); inline JSON parses exactly as before. The one patch not gated on a drafter of this
project: before it, a file path was a parse error
(`vllm/engine/arg_utils.py::EngineArgs.add_cli_args`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from vllm_massv.patches.hook import patches_class


def _json_or_json_file(parse_json: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        text = value.strip()
        if text.startswith("{") or text in ("", "None"):
            return parse_json(value)
        path = os.path.expanduser(text)
        if not os.path.isfile(path):
            # ArgumentTypeError: argparse shows its message (a ValueError's is replaced by
            # "invalid json_or_json_file value").
            raise argparse.ArgumentTypeError(
                f"{value!r} is neither inline JSON nor an existing JSON file")
        with open(path, encoding="utf-8") as fh:
            return parse_json(fh.read())

    parse.__name__ = "json_or_json_file"
    return parse


@patches_class("EngineArgs")
def accept_json_file(cls: type) -> None:
    """`vllm.engine.arg_utils.EngineArgs.add_cli_args`: wrap the flag's JSON parser."""
    stock = cls.add_cli_args

    def add_cli_args(parser, *args, **kwargs):
        parser = stock(parser, *args, **kwargs)
        for action in parser._actions:
            if "--speculative-config" in action.option_strings and action.type is not None:
                action.type = _json_or_json_file(action.type)
        return parser

    cls.add_cli_args = staticmethod(add_cli_args)
