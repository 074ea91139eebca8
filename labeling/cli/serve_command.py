"""`prefloop serve`: the labeling app."""

from __future__ import annotations

import argparse
import sys

from labeling.cli.common import CliError, open_store


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "serve",
        parents=[common],
        help="run the labeling web app (login required unless --single-user)",
        description="Run the labeling web app. Accounts come from `prefloop users add`; "
        "--single-user NAME skips login and makes every visitor the admin NAME (local use only). "
        "Admins start generate/judge/train jobs from the browser with an allow-listed set of "
        "flags (no --base-url, --api-key-env, --reward-function, module:function rubrics, "
        "paths to presets, or --set of paths and trust_remote_code): a job names one of the "
        "--endpoint settings below with `--endpoint NAME`, and its paths must lie inside "
        "--job-dir or a --data-dir (relative paths start in --job-dir). "
        "The CLI itself keeps every flag.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    parser.add_argument(
        "--single-user",
        metavar="NAME",
        default=None,
        help="no login: every visitor acts as the admin account NAME (created if missing)",
    )
    parser.add_argument(
        "--job-dir",
        default=None,
        help="where admin-started job logs go, and where web jobs may write (default: a temp dir)",
    )
    parser.add_argument(
        "--data-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory web jobs may also read and write: --data, --config, --criteria-file, "
        "--output-dir, model directories (repeatable)",
    )
    parser.add_argument(
        "--endpoint",
        action="append",
        default=[],
        type=_endpoint,
        metavar="NAME=URL[,key-env=VAR][,model=MODEL]",
        help="an OpenAI-compatible server web judge/generate jobs may use as `--endpoint NAME`; "
        "the job gets URL, and the API key from the server's $VAR, never shown to the admin "
        "(repeatable; e.g. --endpoint openai=https://api.openai.com/v1,key-env=OPENAI_API_KEY)",
    )
    web = parser.add_argument_group("exposure (see README, Security)")
    web.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="another origin whose pages may call the app, e.g. https://label.example.com "
        "(repeatable; the app's own origin is always allowed)",
    )
    web.add_argument(
        "--forwarded-allow-ips",
        default=None,
        metavar="IPS",
        help="comma-separated addresses of reverse proxies whose X-Forwarded-For is believed "
        "(default: none; the TCP peer is the client)",
    )
    web.add_argument("--max-upload-mb", type=int, default=50, help="largest prompt file an admin may upload")
    parser.set_defaults(handler=run_serve)


def _endpoint(text: str):
    from labeling.app.job_policy import parse_endpoint

    try:
        return parse_endpoint(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def serve_defaults() -> dict:
    """The defaults of `prefloop serve`'s own flags, for commands that end by serving (demo)."""
    parser = argparse.ArgumentParser(add_help=False)
    register(parser.add_subparsers(dest="command"), argparse.ArgumentParser(add_help=False))
    return vars(parser.parse_args(["serve"]))


def run_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from feedback_store.db import session_scope
    from feedback_store.raters import list_users

    engine = open_store(args)
    if not args.single_user:
        with session_scope(engine) as session:
            if not any(user.password_hash and user.active for user in list_users(session=session)):
                raise CliError(
                    "no user can sign in: add one with `prefloop users add NAME --role admin`, "
                    "or run `prefloop serve --single-user NAME` for local use"
                )
    elif args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: --single-user on {args.host}: anyone who can reach this address is an admin",
            file=sys.stderr,
        )

    from labeling.app.server import serve
    from labeling.app.state import AppConfig, AppState
    from labeling.cli.job_commands import JOB_COMMAND_LINE

    names = [endpoint.name for endpoint in args.endpoint]
    for name in names:
        if names.count(name) > 1:
            raise CliError(f"--endpoint {name}: given twice (one URL per name)")

    config = AppConfig(
        db_url=engine.url.render_as_string(hide_password=False),
        single_user=args.single_user,
        job_dir=Path(args.job_dir) if args.job_dir else None,
        allowed_origins=tuple(args.allowed_origin),
        forwarded_allow_ips=args.forwarded_allow_ips,
        max_upload_mb=args.max_upload_mb,
        job_data_dirs=tuple(Path(d) for d in args.data_dir),
        job_endpoints=tuple(args.endpoint),
    )
    # The app checks web jobs with the CLI's parsers, handed in (the app does not import the CLI).
    state = AppState.create(config, engine=engine, command_line=JOB_COMMAND_LINE)
    print(
        f"prefloop app on http://{args.host}:{args.port}"
        + (f" (single user: {args.single_user})" if args.single_user else " (sign-in required)"),
        flush=True,
    )
    serve(state, host=args.host, port=args.port)
    return 0
