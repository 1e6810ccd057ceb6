"""``dvp auth token``: a signed token from the configured issuer; and how acting commands find theirs."""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from domain import AuthError, ConfigError, load_config
from identity import MAX_TOKEN_LENGTH, TokenIssuer

from .output import EXIT_BAD_INPUT, EXIT_OK, CliError, command

__all__ = ["add_parser", "add_token_options", "token_from"]

TOKEN_ENV = "DVP_TOKEN"


def _ttl(text: str) -> timedelta:
    try:
        value = TypeAdapter(timedelta).validate_python(text)
    except ValidationError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an ISO 8601 duration such as PT1H") from None
    if value <= timedelta(0):
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def cmd_token(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.ttl > config.auth.max_token_lifetime:
        raise CliError(
            f"--ttl: {args.ttl} is longer than [auth] max_token_lifetime ({config.auth.max_token_lifetime}); "
            "the engine would refuse the token",
            EXIT_BAD_INPUT,
        )
    try:
        issuer = TokenIssuer.from_config(config.auth)
    except ConfigError as exc:
        raise CliError(f"cannot issue a token: {exc}", EXIT_BAD_INPUT) from None
    try:
        print(issuer.issue(args.subject, args.role or [], ttl=args.ttl))
    except AuthError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    return EXIT_OK


def add_token_options(p: argparse.ArgumentParser) -> None:
    """``--token`` and ``--token-file`` on a command that acts (else ``$DVP_TOKEN``)."""
    p.add_argument("--token", help=f"the signed token to act with (default: ${TOKEN_ENV})")
    p.add_argument("--token-file", help="read the token from this file")


def token_from(args: argparse.Namespace) -> str:
    """The token of an acting command: ``--token``, ``--token-file``, else ``$DVP_TOKEN``.

    Never made here: with none, the command ends (exit 2) before it sends anything.
    """
    token: str | None = getattr(args, "token", None)
    path: str | None = getattr(args, "token_file", None)
    if token and path:
        raise CliError("give --token or --token-file, not both", EXIT_BAD_INPUT)
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise CliError(f"--token-file {path}: {exc.strerror}", EXIT_BAD_INPUT) from None
        if not token:
            raise CliError(f"--token-file {path}: the file is empty", EXIT_BAD_INPUT)
    token = (token or os.environ.get(TOKEN_ENV, "")).strip()
    if not token:
        raise CliError(
            f"no token: this command acts for someone, so it needs a signed token in --token, "
            f"--token-file or ${TOKEN_ENV} (make one with `dvp auth token SUBJECT`); nothing was sent",
            EXIT_BAD_INPUT,
        )
    if len(token) > MAX_TOKEN_LENGTH:
        raise CliError(f"token: longer than {MAX_TOKEN_LENGTH} characters", EXIT_BAD_INPUT)
    return token


def add_parser(sub: Any) -> None:
    """``dvp auth token SUBJECT [--role ROLE]... [--ttl DURATION]``."""
    auth = sub.add_parser("auth", help="signed tokens: who a command acts for")
    asub = auth.add_subparsers(dest="auth_command", required=True, metavar="COMMAND")
    p = command(asub, "token", cmd_token, "print a token for SUBJECT signed by the configured issuer's key")
    p.add_argument("subject", help="who the token speaks for (a party, an approver, an operator)")
    p.add_argument("--role", action="append", help="a role the token carries (repeatable)")
    p.add_argument(
        "--ttl", type=_ttl, default=timedelta(hours=1), help="ISO 8601 lifetime, e.g. PT8H (default PT1H)"
    )
