"""`prefloop users add|list`: annotator and admin accounts."""

from __future__ import annotations

import argparse
import getpass
import sys

from labeling.cli.common import CliError, open_store


def register(subparsers, common: argparse.ArgumentParser) -> None:
    users = subparsers.add_parser("users", help="annotator and admin accounts")
    actions = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = actions.add_parser(
        "add",
        parents=[common],
        help="add a user, or reset an existing user's password and role",
        description="The password is read from a prompt, or from the first line of stdin when stdin is not a terminal.",
    )
    add.add_argument("name", help="user name (what they type to sign in)")
    add.add_argument(
        "--role", choices=("annotator", "admin"), default="annotator", help="default: annotator"
    )
    add.set_defaults(handler=run_add)
    listing = actions.add_parser("list", parents=[common], help="list users")
    listing.set_defaults(handler=run_list)


def read_password(stream=None) -> str:
    stream = stream or sys.stdin
    if stream.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise CliError("the two passwords differ")
        return first
    line = stream.readline()
    if not line:
        raise CliError(
            'no password on stdin (pipe one line, e.g. `echo "$PW" | prefloop users add NAME`)'
        )
    return line.rstrip("\r\n")


def run_add(args: argparse.Namespace) -> int:
    from feedback_store.db import session_scope
    from feedback_store.models import Role
    from feedback_store.raters import create_user, get_rater

    password = read_password()
    engine = open_store(args)
    try:
        with session_scope(engine) as session:
            existed = get_rater(args.name, session=session) is not None
            create_user(args.name, password, session=session, role=Role(args.role))
    except ValueError as error:
        raise CliError(f"user {args.name!r}: {error}") from None
    print(f"{'updated' if existed else 'added'} {args.role} {args.name}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from feedback_store.db import session_scope
    from feedback_store.raters import list_users

    with session_scope(open_store(args)) as session:
        users = list_users(session=session)
    if not users:
        print("no users yet: add one with `prefloop users add NAME --role admin`")
        return 0
    width = max(len(user.name) for user in users)
    for user in users:
        role = user.role.value if user.role else "annotator"
        state = "active" if user.active else "deactivated"
        login = "" if user.password_hash else " (no password: single-user account)"
        print(f"{user.name:<{width}}  {role:<9}  {state}{login}")
    return 0
