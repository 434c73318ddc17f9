"""The ``embviz`` command line: the same engine as the app, headless, for sweeps and exports.

Every command prints progress on stderr and, with ``--json``, exactly one JSON object (or array) on stdout.
User errors print one line (``embviz: error: ...``) and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from embviz.errors import EmbvizError

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help_text: str) -> Callable[[Callable[[argparse.ArgumentParser], None]], Callable]:
    """Register ``embviz NAME``: decorate the function that adds its arguments; it names its runner."""

    def register(add_arguments: Callable[[argparse.ArgumentParser], None]) -> Callable:
        def bind(run: Command) -> Command:
            _COMMANDS[name] = (run, add_arguments, help_text)
            return run

        add_arguments.runs = bind  # type: ignore[attr-defined]
        return add_arguments

    return register


def emit(payload: Any, as_json: bool, render: Callable[[Any], str] | None = None) -> None:
    """Print ``payload`` as one JSON document, or as human text."""
    if as_json:
        print(json.dumps(payload, default=str))
    else:
        print(render(payload) if render else _render_mapping(payload))


def _render_mapping(payload: Any) -> str:
    if isinstance(payload, dict):
        width = max((len(str(k)) for k in payload), default=0)
        return "\n".join(f"{key:<{width}}  {value}" for key, value in payload.items())
    return str(payload)


def _load_backbone(args: argparse.Namespace):
    from embviz.backbones import Backbone

    return Backbone.from_pretrained(args.model, trust_remote_code=getattr(args, "trust_remote_code", False))


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="built-in name (smollm2, minilm), local HF folder, or hub id")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model's own Python code to run (off by default; only for sources you trust)",
    )


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


# -- info ----------------------------------------------------------------------------------------------
@command("info", "facts about a backbone: kind, vocabulary, hidden size, tied, embedding parameters")
def _info_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model(parser)
    _add_json(parser)


@_info_arguments.runs
def run_info(args: argparse.Namespace) -> int:
    emit(_load_backbone(args).info().to_dict(), args.json)
    return 0


# -- corpora -------------------------------------------------------------------------------------------
@command("corpora", "list the packaged text sets with their size per split (tokens for a given model)")
def _corpora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="count tokens with this backbone's tokenizer (default smollm2)", default="smollm2"
    )
    parser.add_argument("--no-tokens", action="store_true", help="skip token counts (words and units only)")
    _add_json(parser)


@_corpora_arguments.runs
def run_corpora(args: argparse.Namespace) -> int:
    from embviz.corpora import corpus_stats

    tokenize = None
    if not args.no_tokens:
        tokenizer = _load_backbone(args).tokenizer

        def tokenize(texts: list[str]) -> list[list[int]]:
            return tokenizer(texts, add_special_tokens=False)["input_ids"]

    rows = corpus_stats(tokenize)
    emit(rows, args.json, _render_table)
    return 0


def _render_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    columns = [c for c in rows[0] if c != "description"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(f"{c:>{widths[c]}}" for c in columns)]
    lines += ["  ".join(f"{r.get(c, '')!s:>{widths[c]}}" for c in columns) for r in rows]
    return "\n".join(lines)


# -- entry point ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from embviz import __version__

    parser = argparse.ArgumentParser(prog="embviz", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"embviz {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (run, add_arguments, help_text) in _COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="embviz: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.run(args)
    except EmbvizError as error:
        print(f"embviz: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("embviz: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
