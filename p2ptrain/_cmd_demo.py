"""``p2ptrain demo``: several local peers find each other and train a small model."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=int, default=3, help="local peers to start (default 3)")
    parser.add_argument("--steps", type=int, default=50, help="training steps (default 50)")


def main(args: argparse.Namespace) -> int:
    print("p2ptrain demo: training is not implemented yet in this release.")
    print("What works today: the wire and codecs (`p2ptrain bench transport|codecs`).")
    return 0
