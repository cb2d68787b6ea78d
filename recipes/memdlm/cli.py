"""Command line for the MemDLM recipe (filled in by the recipe issue)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.memdlm",
        description="Train, evaluate and compare MemDLM against the standard MDLM baseline.",
    )
    sub = parser.add_subparsers(dest="command")
    for name, text in [
        ("train", "train one method"),
        ("eval", "evaluate a checkpoint"),
        ("sample", "generate text from a prompt"),
        ("compare", "train both methods from one base and compare them (default)"),
    ]:
        sub.add_parser(name, help=text, description=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    return 0
