"""The ``coreloop`` command line: serve, db, users, import, bench (and more, by name).

Each subcommand is a ``Command`` in ``COMMANDS``: a function that adds its arguments and one
that runs it and returns the exit code. Expected errors (bad input, unknown project, an
existing user) print one line and exit with 2; no traceback. Settings come from
``app.settings.get_settings()`` (``CORELOOP_`` environment variables).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.errors import CoreloopError
from app.settings import Settings, get_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class Command:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _say(message: str) -> None:
    print(message, file=sys.stderr)


@contextmanager
def _database(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Upgrade the schema (a no-op when current); a session factory until the block ends."""
    from app.db import make_engine, make_sessionmaker
    from app.migrate import upgrade

    engine = make_engine(settings)
    try:
        upgrade(engine)
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def _upgrade(settings: Settings) -> None:
    with _database(settings):
        pass


# -- serve -------------------------------------------------------------------------------------


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="API processes (default: 1 on SQLite; on PostgreSQL one per CPU core this "
        "process may use, at most 8)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="log every request (off by default: it costs CPU on the hot path)",
    )
    parser.add_argument(
        "--no-worker",
        action="store_true",
        help="do not start the embedded Celery worker (scale-out: run `coreloop worker`)",
    )


EMBEDDED_WORKER_NICE = 10
MAX_DEFAULT_WORKERS = 8


def default_workers(sqlite: bool) -> int:
    """The API processes ``coreloop serve`` starts: one on SQLite, else one per CPU core this
    process may use, at most 8.

    SQLite takes one writer at a time, and one process runs the hot paths' transactions on its
    event loop (``app.deps.in_unit_of_work``); a second process only adds hand-overs of the
    write lock between processes. On 2 cores one process served as many cycles or more with
    about a third less CPU per cycle (README, Figures), which leaves the rest to training.
    """
    if sqlite:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores))


def _run_serve(args: argparse.Namespace) -> int:
    """The API, plus (embedded default) a worker child process that lives as long as it."""
    import uvicorn

    settings = get_settings()
    _upgrade(settings)
    worker = None
    if settings.embedded_worker and not args.no_worker:
        from worker.embedded import start_worker  # imports neither Celery nor torch

        # Below the API's priority: training takes what the API leaves idle.
        worker = start_worker(settings, nice=EMBEDDED_WORKER_NICE)
        _say(f"started the embedded worker (pid {worker.pid}, nice {EMBEDDED_WORKER_NICE})")
    workers = args.workers or default_workers(settings.is_sqlite)
    _say(f"serving on http://{args.host}:{args.port} with {workers} API process(es)")
    # With one process, uvicorn shuts down on SIGTERM and then raises the signal again with
    # the handler it found: with the default one, this process would die there, before the
    # finally below stops the worker (which would go on alone until it noticed). This handler
    # turns that second SIGTERM into an exception; the signal is raised once the worker is
    # stopped, so that whoever sent it still sees this process end by it.
    previous = signal.signal(signal.SIGTERM, _raise_terminated) or signal.SIG_DFL
    terminated = False
    try:
        uvicorn.run(
            "app.main:create_app", factory=True, host=args.host, port=args.port,
            workers=workers, access_log=args.access_log,
        )  # fmt: skip
    except _Terminated:
        terminated = True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one: stop the worker anyway
        if worker is not None:
            from worker.embedded import stop_worker

            stop_worker(worker)
        signal.signal(signal.SIGTERM, previous)
    if terminated:
        signal.raise_signal(signal.SIGTERM)
    return EXIT_OK


class _Terminated(Exception):
    """SIGTERM reached ``coreloop serve`` outside uvicorn's own handler."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


# -- db ----------------------------------------------------------------------------------------


def _configure_db(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="db_command", required=True, metavar="{upgrade}")
    sub.add_parser("upgrade", help="upgrade the schema to the newest migration")


def _run_db(args: argparse.Namespace) -> int:
    from sqlalchemy.engine.url import make_url

    settings = get_settings()
    _upgrade(settings)
    print(f"database {make_url(settings.db_url).render_as_string()} is up to date")
    return EXIT_OK


# -- users -------------------------------------------------------------------------------------


def _expiry_days(text: str) -> int:
    value = _positive_int(text)
    if value > 3650:
        raise argparse.ArgumentTypeError(f"must be at most 3650 days, not {value}")
    return value


def _add_expires_in(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--expires-in",
        type=_expiry_days,
        metavar="DAYS",
        help="the token expires after DAYS days (default: never)",
    )


def _configure_users(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(
        dest="users_command", required=True, metavar="{create,revoke,rotate}"
    )
    create = sub.add_parser("create", help="create a user and print their API token once")
    create.add_argument("--name", required=True)
    create.add_argument(
        "--role",
        choices=["admin", "annotator", "reviewer", "integration"],
        default="annotator",
        help="integration: Label Studio's credential, for /ls/* only; annotators and reviewers "
        "reach only the projects they are members of (`coreloop members add`)",
    )
    _add_expires_in(create)
    revoke = sub.add_parser(
        "revoke", help="make a user's token stop working (no new one until rotate)"
    )
    revoke.add_argument("user", help="user name or id")
    rotate = sub.add_parser(
        "rotate", help="give a user a new token (printed once); the old one stops"
    )
    rotate.add_argument("user", help="user name or id")
    _add_expires_in(rotate)


_PROPAGATION = (
    "A running API accepts the old token for up to 5 seconds more (its token cache); "
    "revoking or rotating through the API (POST /users/{id}/revoke|rotate) takes effect at once "
    "in that process."
)


def _print_token(token: str) -> None:
    print(token)
    print("The token is shown only once; store it now (send it as 'Authorization: Bearer ...').")


def _run_users(args: argparse.Namespace) -> int:
    from app.db import unit_of_work
    from app.users.service import create_user, revoke_token, rotate_token

    with _database(get_settings()) as sessions, unit_of_work(sessions) as session:
        if args.users_command == "revoke":
            user = revoke_token(session, args.user)
            token = None
        elif args.users_command == "rotate":
            user, token = rotate_token(session, args.user, args.expires_in)
        else:
            user, token = create_user(session, args.name, args.role, args.expires_in)
        name, role, expires = user.name, user.role, user.token_expires_at
    until = f", valid until {expires.isoformat(timespec='seconds')}" if expires else ""
    if args.users_command == "revoke":
        print(f"revoked the token of {role} {name!r}; `coreloop users rotate` gives a new one.")
        _say(_PROPAGATION)
        return EXIT_OK
    assert token is not None
    verb = "created" if args.users_command == "create" else "rotated the token of"
    print(f"{verb} {role} {name!r}{until}; API token:")
    _print_token(token)
    if args.users_command == "rotate":
        _say(_PROPAGATION)
    return EXIT_OK


# -- members -----------------------------------------------------------------------------------


def _configure_members(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="members_command", required=True, metavar="{add,list,remove}")
    add = sub.add_parser("add", help="make a user a member of a project")
    add.add_argument("project", help="project name or id")
    add.add_argument("user", help="user name or id")
    add.add_argument(
        "--role",
        choices=["annotator", "reviewer"],
        default=None,
        help="the role in this project (default: the user's own, when annotator or reviewer)",
    )
    listing = sub.add_parser("list", help="a project's members")
    listing.add_argument("project", help="project name or id")
    remove = sub.add_parser("remove", help="end a membership (the user's labels stay)")
    remove.add_argument("project", help="project name or id")
    remove.add_argument("user", help="user name or id")


def _run_members(args: argparse.Namespace) -> int:
    from app.db import unit_of_work
    from app.members import service as members
    from app.projects.service import find_project
    from app.users.service import get_user

    with _database(get_settings()) as sessions, unit_of_work(sessions) as session:
        project = find_project(session, args.project)
        if args.members_command == "list":
            for member, user in members.list_members(session, project.id):
                print(f"{user.id}\t{user.name}\t{member.role}")
            return EXIT_OK
        user = get_user(session, args.user)
        if args.members_command == "remove":
            members.remove_member(session, project.id, user.id)
            print(f"removed {user.name!r} from project {project.name!r}")
            return EXIT_OK
        member = members.add_member(session, project.id, user, args.role)
        print(f"added {user.name!r} to project {project.name!r} as {member.role}")
    return EXIT_OK


def _configure_agreement(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("project", help="project name or id")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def _run_agreement(args: argparse.Namespace) -> int:
    from app.agreement.service import project_agreement
    from app.db import unit_of_work
    from app.projects.service import find_project
    from app.storage import Storage

    settings = get_settings()
    with _database(settings) as sessions, unit_of_work(sessions) as session:
        project = find_project(session, args.project)
        figures = project_agreement(session, Storage(settings.files_dir), project)
    if args.json:
        print(json.dumps(figures, indent=2, default=str))
        return EXIT_OK
    print(format_agreement(figures))
    return EXIT_OK


def format_agreement(figures: dict[str, Any]) -> str:
    """The agreement figures as the admin view shows them, in plain text."""

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    classes = figures["task"] == "classification"
    head = [
        f"project {figures['project_id']} ({figures['task']}), "
        f"{figures['overlap']} reads per image",
        f"images compared: {figures['images_compared']}, with all reads: "
        f"{figures['images_with_all_reads']}",
        f"adjudication rate: {fmt(figures['adjudication_rate'])}",
    ]
    if classes:
        head.append(f"kappa ({figures['kappa_method']}): {fmt(figures['kappa'])}, raw agreement: "
                    f"{fmt(figures['agreement'])} over {figures['pairs']} pairs")  # fmt: skip
        names = ", ".join(figures["classes"])
        head.append(f"confusion between readers (rows and columns: {names})")
        head += ["  " + " ".join(f"{n:>5}" for n in row) for row in figures["confusion"]]
    else:
        head.append(f"mean Dice: {fmt(figures['mean_dice'])}, mean IoU: {fmt(figures['mean_iou'])} "
                    f"over {figures['pairs']} pairs")  # fmt: skip
    score = "kappa" if classes else "mean_dice"
    head.append(f"{'annotator':<24} {'reads':>6} {'pairs':>6} {score:>9}")
    head += [
        f"{str(a['name']):<24} {a['reads']:>6} {a['pairs']:>6} {fmt(a[score]):>9}"
        for a in figures["annotators"]
    ]
    return "\n".join(head)


# -- import ------------------------------------------------------------------------------------


def _configure_import(parser: argparse.ArgumentParser) -> None:
    from app.images.importer import LAYOUTS

    parser.add_argument("--project", required=True, help="project name or id")
    parser.add_argument("--images", required=True, type=Path, help="folder of images")
    parser.add_argument("--csv", type=Path, help="metadata CSV (HAM10000: the metadata file)")
    parser.add_argument("--masks", type=Path, help="folder of <id>_segmentation.png masks")
    parser.add_argument("--layout", choices=LAYOUTS, default="ham10000")
    parser.add_argument("--split", choices=["pool", "val", "test"], default="pool")
    parser.add_argument("--with-labels", action="store_true", help="also import the labels")
    parser.add_argument("--limit", type=_positive_int, help="import at most N images")
    parser.add_argument("--batch-size", type=_positive_int, default=200)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _run_import(args: argparse.Namespace) -> int:
    from app.images.importer import ImportOptions, import_images
    from app.storage import Storage

    settings = get_settings()
    options = ImportOptions(
        layout=args.layout,
        csv_path=args.csv,
        masks_dir=args.masks,
        split=args.split,
        with_labels=args.with_labels,
        limit=args.limit,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    storage = Storage(settings.files_dir)
    with _database(settings) as sessions:
        result = import_images(sessions, storage, settings, args.project, args.images, options)
    for message in result.messages[:20]:
        _say(f"skipped {message}")
    if result.errors > 20:
        _say(f"... and {result.errors - 20} more")
    print(
        f"created {result.created}, duplicates {result.duplicates}, "
        f"labeled {result.labeled}, errors {result.errors}"
    )
    return EXIT_FAILED if result.errors else EXIT_OK


# -- bench -------------------------------------------------------------------------------------


def _configure_bench(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="{select}")
    # No arguments of its own (not even -h): everything after ``select`` goes to ml.bench.
    sub.add_parser("select", help="the selection benchmark (ml.bench)", add_help=False)


def _run_bench(args: argparse.Namespace) -> int:
    from ml.bench import main as bench_main  # torch: imported only when asked for

    return int(bench_main(list(args.forwarded)) or 0)


# -- commands implemented elsewhere -------------------------------------------------------------


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """A command whose own parser (in its module) reads the forwarded arguments."""


def _run_worker(args: argparse.Namespace) -> int:
    from worker.main import main as worker_main

    return int(worker_main(list(args.forwarded)) or 0)


def _run_simulate(args: argparse.Namespace) -> int:
    forwarded = list(args.forwarded)
    if any(a == "--via-api" or a.startswith("--via-api=") for a in forwarded):
        from coreloop.via_api import run as via_api_run
        from ml.simulate import parse_args

        return via_api_run(parse_args(forwarded))
    from ml.simulate import main as simulate_main  # torch: imported only when asked for

    return int(simulate_main(forwarded) or 0)


def _run_report(args: argparse.Namespace) -> int:
    from ml.report import main as report_main

    return int(report_main(list(args.forwarded)) or 0)


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    from coreloop.demo import configure

    configure(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from coreloop.demo import run

    return run(args)


COMMANDS: dict[str, Command] = {
    "serve": Command("run the API (upgrades the database first)", _configure_serve, _run_serve),
    "db": Command("database schema commands", _configure_db, _run_db),
    "users": Command("manage users", _configure_users, _run_users),
    "members": Command("manage project members", _configure_members, _run_members),
    "agreement": Command(
        "how much a project's readers agree (kappa, Dice, adjudication rate)",
        _configure_agreement,
        _run_agreement,
    ),
    "import": Command("import a folder of images (and labels)", _configure_import, _run_import),
    "bench": Command("benchmarks (needs the ml extra)", _configure_bench, _run_bench),
    "worker": Command("run a Celery worker (coreloop worker -h)", _no_arguments, _run_worker),
    "demo": Command("the whole system on this machine, in minutes", _configure_demo, _run_demo),
    "simulate": Command(
        "the active-learning benchmark with an oracle annotator (coreloop simulate -h)",
        _no_arguments,
        _run_simulate,
    ),
    "report": Command("plots and tables from a simulate CSV", _no_arguments, _run_report),
}


# Commands whose unknown arguments are passed on (to a tool with its own parser).
FORWARDING = {"bench", "worker", "simulate", "report"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coreloop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        # A forwarding command's own parser answers -h (``coreloop simulate -h``).
        add_help = name not in FORWARDING or name == "bench"
        parser_ = sub.add_parser(
            name, help=command.help, description=command.help, add_help=add_help
        )
        command.configure(parser_)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (``argparse`` exits 2 itself on bad usage)."""
    parser = build_parser()
    args, forwarded = parser.parse_known_args(argv)
    if forwarded and args.command not in FORWARDING:
        parser.error(f"unrecognized arguments: {' '.join(forwarded)}")
    args.forwarded = forwarded
    try:
        return COMMANDS[args.command].run(args)
    except CoreloopError as exc:
        _say(f"error: {exc.detail}")
        return EXIT_USAGE
    except ValidationError as exc:  # settings from CORELOOP_ variables
        _say(f"error: invalid settings (CORELOOP_ environment variables): {exc}")
        return EXIT_USAGE
    except OperationalError as exc:
        _say(f"error: the database cannot be used: {exc.orig or exc}")
        return EXIT_FAILED
    except OSError as exc:
        _say(f"error: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
