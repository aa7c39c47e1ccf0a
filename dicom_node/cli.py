"""``dicom-node``: serve, check a config, manage jobs, mint tokens, run the models on files.

Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

import dicom_node
from dicom_node.config import ConfigError, Settings, load_settings
from dicom_node.errors import NodeError
from dicom_node.infer import UsageError

EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool cut off by `head`

_EPILOG = """\
examples:
  dicom-node serve                          # embedded defaults, data in ./data
  dicom-node serve --config configs/node.yaml --data-dir /srv/dicom-node
  dicom-node check-config configs/node.yaml
  dicom-node jobs list --state failed
  dicom-node studies list                   # what has arrived, newest first
  dicom-node token --scope infer --expires 8h
  dicom-node echo                           # can the node reach its PACS and folders?
  dicom-node infer samples/cxr/pleural-effusion.dcm --out results
  dicom-node infer /media/cdrom/DICOM --model ct-organs

Settings come from the YAML file, then DICOM_NODE_* environment variables
(DICOM_NODE_DIMSE__PORT=11113), then the options below.
"""


def version_line() -> str:
    """``dicom-node 0.1.0 (store schema 9)``: the schema tells which release a store
    refused as newer or older belongs with."""
    from dicom_node.store import SCHEMA_VERSION

    return f"dicom-node {dicom_node.__version__} (store schema {SCHEMA_VERSION})"


def _config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, metavar="FILE",
                   help="YAML settings (default: $DICOM_NODE_CONFIG when set, else built-in "
                   "defaults, see configs/node.yaml)")
    p.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="where the store, studies, results and inbox live (default ./data)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description="A DICOM node that receives studies, runs AI models on them and sends "
        "the results back.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the node (DICOM, HTTP, drop folders, jobs)",
                           description="Run the node until Ctrl-C or SIGTERM. Running jobs "
                           "get executor.grace_period_s to finish; the rest are re-queued.")
    _config_options(serve)
    serve.add_argument("--dicom-port", type=int, metavar="N", help="DICOM listening port")
    serve.add_argument("--http-port", type=int, metavar="N", help="HTTP listening port")
    serve.add_argument("--ae-title", metavar="T", help="the node's own AE title")

    check = sub.add_parser("check-config", help="validate a settings file and exit",
                           description="Load FILE as `serve` would; print the problem and exit "
                           "2 if it is wrong, print a summary and exit 0 if not. With "
                           "--models, also load every model and run its warm-up as `serve` "
                           "does, and exit 1 if one fails.")
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument("--data-dir", type=Path, metavar="DIR")
    check.add_argument("--models", action="store_true",
                       help="also load each model as serve would (slower: seconds a model)")

    jobs = sub.add_parser("jobs", help="list, show, cancel or retry jobs",
                          description="Inspect and steer jobs in the store (works whether or "
                          "not the node is running).")
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    jl = jsub.add_parser("list", help="recent jobs, newest first")
    _config_options(jl)
    jl.add_argument("--state", action="append",
                    choices=["queued", "retrieving", "running", "exporting", "succeeded",
                             "failed", "cancelled"], help="only jobs in this state (repeatable)")
    jl.add_argument("--limit", type=_jobs_list_limit, default=20,
                    help=f"at most this many (default 20, at most {JOBS_LIST_MAX})")
    jl.add_argument("--json", action="store_true", help="one JSON object per line")
    for name, text in (("show", "one job with its history, artifacts and exports"),
                       ("cancel", "cancel a queued job, or stop a running one"),
                       ("retry", "queue a failed or cancelled job again (a study's "
                                 "job: with all of the study held now)")):
        jp = jsub.add_parser(name, help=text)
        _config_options(jp)
        jp.add_argument("job_id", metavar="JOB_ID",
                        help="the job's id (or its first characters, at least 4, when they "
                        "name one job) or the transactionID of an inference request")
        if name == "show":
            jp.add_argument("--json", action="store_true")

    studies = sub.add_parser("studies", help="list, show or delete the studies the node holds",
                             description="What the node has received (DIMSE, STOW-RS, drop "
                             "folders, retrievals), from its store; works whether or not the "
                             "node is running.")
    ssub = studies.add_subparsers(dest="studies_command", metavar="ACTION", required=True)
    sl = ssub.add_parser("list", help="the most recently received studies first")
    _config_options(sl)
    sl.add_argument("--patient", metavar="ID", help="only this Patient ID's studies")
    sl.add_argument("--limit", type=_list_limit("studies", "--patient"), default=20,
                    help=f"at most this many (default 20, at most {STUDIES_LIST_MAX})")
    sl.add_argument("--json", action="store_true", help="one JSON object per line")
    ss = ssub.add_parser("show", help="one study series by series, with its jobs")
    _config_options(ss)
    ss.add_argument("study", metavar="STUDY_UID",
                    help="the Study Instance UID (or its start, when that names one study)")
    ss.add_argument("--json", action="store_true")
    sd = ssub.add_parser(
        "delete", help="delete a study's files and records (a misdirected study, say)",
        description="Delete the instances of one study from the studies folder and the "
        "store, after asking (or with --yes). Refused while a job of the study is not "
        "finished or the study is still arriving. Its jobs and their results stay unless "
        "--results is given.")
    _config_options(sd)
    sd.add_argument("study", metavar="STUDY_UID",
                    help="the Study Instance UID (or its start, when that names one study)")
    sd.add_argument("--results", action="store_true",
                    help="also delete the results folders of the study's jobs")
    sd.add_argument("--yes", "-y", action="store_true", help="do not ask")

    token = sub.add_parser("token", help="mint a JWT for the HTTP APIs",
                           description="Sign a token with the node's secret and print it alone "
                           "on the last line.")
    _config_options(token)
    token.add_argument("--subject", default="dicom-node-cli", help="the `sub` claim")
    token.add_argument("--scope", action="append", choices=["infer", "read", "admin"],
                       help="scopes to grant (repeatable; default infer and read)")
    token.add_argument("--expires", default="1h", metavar="DURATION",
                       help="lifetime: seconds or a number with s/m/h/d (default 1h)")
    token.add_argument("--group", metavar="NAME",
                       help="the `group` claim: the batch API's groupName (seed 002) whose "
                       "jobs the token may start and read (default: none)")
    token.add_argument("--project", action="append", metavar="NAME|ID",
                       help="the `projects` claim (repeatable): the only batch API projects "
                       "(called AE titles, drop folders) whose sources the token may list "
                       "and run models on (default: every project)")
    echo = sub.add_parser(
        "echo", help="check that configured sources and destinations answer",
        description="C-ECHO every configured DIMSE source and destination, QIDO-RS every "
        "DICOMweb one and check that folder destinations are writable, from this machine "
        "with the node's AE title and TLS settings (objects added with the config API "
        "included). Exit 0 when all answer, 1 when one does not.")
    _config_options(echo)
    echo.add_argument("names", nargs="*", metavar="NAME",
                      help="only these sources or destinations (default: all)")
    echo.add_argument("--json", action="store_true", help="one JSON object per check")
    conformance = sub.add_parser(
        "conformance", help="print the node's DICOM Conformance Statement (Markdown)",
        description="Print the DICOM Conformance Statement for these settings: SOP classes, "
        "transfer syntaxes in order of preference, roles, called AE titles, rejections and "
        "statuses, written from the lists the node itself uses. docs/conformance.md is the "
        "one for the built-in defaults.")
    _config_options(conformance)
    infer = sub.add_parser(
        "infer", help="run the models on DICOM files, a series folder or a tree of studies",
        description="Read the DICOM files under PATH, group them by study and run each "
        "study through the pipelines whose series rules suit it (or the one --model names). "
        "Results (JSON, PNG, PDF and the DICOM objects the pipeline is configured for) are "
        "written under --out, as the node writes a job's; nothing is stored or sent. Exit 0 "
        "when everything ran, 1 when a study failed or nothing could run, 2 for bad usage.")
    _config_options(infer)
    infer.add_argument("path", type=Path, nargs="+", metavar="PATH",
                       help="a DICOM file, a series folder or a tree of studies")
    infer.add_argument("--model", "-m", metavar="NAME",
                       help="a configured pipeline or model, or the path of a MONAI bundle "
                       "folder or TorchScript file (with its .json) to try (default: every "
                       "pipeline a study suits)")
    infer.add_argument("--out", "-o", type=Path, metavar="DIR", default=None,
                       help="where the results go (default ./dicom-node-results)")
    infer.add_argument("--device", choices=["auto", "cpu", "cuda"],
                       help="run the models here (default: as configured, auto)")
    infer.add_argument("--json", action="store_true",
                       help="print a JSON summary on stdout (progress goes to stderr)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    try:
        if args.command == "check-config":
            return _check_config(args)
        settings = _settings(args)
        if args.command == "serve":
            return _serve(settings)
        if args.command == "jobs":
            return _jobs(args, settings)
        if args.command == "studies":
            return _studies(args, settings)
        if args.command == "token":
            return _token(args, settings)
        if args.command == "infer":
            return _infer(args, settings)
        if args.command == "echo":
            return _echo(args, settings)
        if args.command == "conformance":
            from dicom_node.conformance import statement

            print(statement(settings), end="")
            return 0
    except UsageError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        print(f"dicom-node: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except NodeError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except SQLAlchemyError as exc:
        # one line, not a traceback: on a full disk `jobs cancel` printed forty
        cause = (str(getattr(exc, "orig", None) or exc).splitlines() or [type(exc).__name__])[0]
        hint = ("; free space on the disk of the data directory, then try again"
                if "full" in cause else "")
        print(f"dicom-node: the job store failed: {cause}{hint}", file=sys.stderr)
        return EXIT_RUNTIME
    except BrokenPipeError:
        # The reader went away (`dicom-node jobs list | head`): stop quietly, as Unix
        # tools do; what Python would flush at exit goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    parser.error(f"unknown command {args.command}")
    return EXIT_CONFIG


def _settings(args: argparse.Namespace, config: Path | None = None) -> Settings:
    overrides: dict[str, Any] = {
        "storage.data_dir": str(args.data_dir) if getattr(args, "data_dir", None) else None,
        "dimse.port": getattr(args, "dicom_port", None),
        "rest.port": getattr(args, "http_port", None),
        "dimse.ae_title": getattr(args, "ae_title", None),
    }
    env_config = os.environ.get("DICOM_NODE_CONFIG") or None
    return load_settings(config or getattr(args, "config", None)
                         or (Path(env_config) if env_config else None), overrides=overrides)


def shown_url(url: str) -> str:
    """A database URL as it may be printed: its password masked (the systemd unit's
    check-config before each start writes this into the journal)."""
    from sqlalchemy.engine import make_url

    return str(make_url(url).render_as_string(hide_password=True))


def _check_config(args: argparse.Namespace) -> int:
    s = _settings(args, config=args.file)
    print(f"{args.file}: OK")
    for warning in s.warnings():  # valid, but probably not what was meant; exit 0
        print(f"dicom-node: warning: {args.file}: {warning}", file=sys.stderr)
    print(f"  data directory  {s.data_dir.resolve()}")
    print(f"  store           {shown_url(s.database_url)}")
    # an AE title without pipelines is an archive: it stores what it gets, makes no job
    called = [a.ae_title + ("" if a.pipelines else " (stores only)") for a in s.ae_titles]
    print(f"  DICOM           {s.dimse.ae_title} on port {s.dimse.port}; called AE titles: "
          f"{', '.join(called) or 'none'}")
    print(f"  HTTP            port {s.rest.port}" if s.rest.enabled else "  HTTP            off")
    print(f"  models          {', '.join(m.name for m in s.models) or 'none'}")
    print(f"  pipelines       {', '.join(p.name for p in s.pipelines) or 'none'}")
    print(f"  destinations    {', '.join(d.name for d in s.destinations) or 'none'}")
    folders = [str(s.path(w.path)) + ("" if w.pipelines else " (no pipelines)")
               for w in s.watch]
    print(f"  drop folders    {', '.join(folders) or 'none'}")
    days = s.storage.retention_days
    print(f"  retention       {f'{days:g} days' if days is not None else 'off (keep everything)'}")
    line, invalid = _stored_objects_line(s)
    print(f"  config API      {line}")
    for obj in invalid:  # a called AE title gone from a running node is a misconfiguration
        problems = "; ".join(f"{p['field']}: {p['message']}" for p in obj.problems)
        print(f"dicom-node: configuration error: the config API's {obj.kind} {obj.name!r} "
              f"stored in the store does not validate and would not be in force: {problems}; "
              f"fix it with PUT /config/{obj.kind}/{obj.name} or remove it with DELETE",
              file=sys.stderr)
    if invalid:
        return EXIT_CONFIG
    return _check_models(s) if args.models else 0


def _stored_objects_line(settings: Settings) -> tuple[str, list[Any]]:
    """What the objects the config API stored do to the file's entries, when the store
    is an SQLite file that can be read at once (a database server is not contacted)."""
    from dicom_node import runtime_config

    url = settings.database_url
    if not url.startswith("sqlite:///"):
        return ("not read (the store is a database server); the start-up log names the "
                "file entries its objects replace or delete, and those that do not "
                "validate"), []
    if not Path(url.removeprefix("sqlite:///")).exists():
        return "no objects stored", []
    from dicom_node.store import SCHEMA_VERSION

    try:
        store = _open_store(settings, older_ok=True)
    except NodeError as exc:
        # The settings are checked and valid; what keeps the store from opening (a full
        # disk) is `serve`'s to report. It printed "OK", then this error, and exit 1.
        print(f"dicom-node: warning: the store's config API objects cannot be read: {exc}",
              file=sys.stderr)
        return "not read: the store cannot be opened (see the warning)", []
    try:
        objects = _config_objects(store)
        found = store.schema_version()
    finally:
        store.close()
    if found < SCHEMA_VERSION:  # a note: check-config is about the settings
        print(f"dicom-node: note: {_older_store(store, found)}", file=sys.stderr)
    count = sum(len(v) for v in objects.values())
    if not count:
        return "no objects stored", []
    invalid: list[runtime_config.SkippedObject] = []
    merged = runtime_config.merge(settings, objects, skipped=invalid, quiet=True)
    changes = [f"{kind} {name!r} {action}"
               for kind, name, action in runtime_config.file_overrides(settings, merged, objects)]
    line = f"{count} objects stored; file entries " + (", ".join(changes) or "none overridden")
    if invalid:
        line += "; invalid (not in force): " + ", ".join(f"{o.kind} {o.name!r}"
                                                         for o in invalid)
    return line, invalid


_SOURCES = {"state_dict": "weights (model.pt)", "torchscript": "TorchScript"}


def _check_models(settings: Settings) -> int:
    """Load each configured model version as ``serve`` does, warm-up included; one
    line each. Returns 1 when one fails."""
    from pipeline.runner import PipelineRunner

    print("models (each loaded and warmed up as serve does):")
    failed = 0
    for spec in settings.models:
        pipelines = [p for p in settings.pipelines if p.model == spec.name
                     and p.model_version in (None, spec.version)]
        runner = PipelineRunner([spec], pipelines, settings.model_path)
        t0 = time.perf_counter()
        try:
            runner.start()
            took = time.perf_counter() - t0
            label = f"{spec.name}{f' {spec.version}' if spec.version else ''}"
            if spec.name in runner.failed:
                failed += 1
                print(f"  {label:24} FAILED  {runner.failed[spec.name]}")
                continue
            m = runner.model(spec.name, spec.version)
            size = "x".join(str(n) for n in m.spatial_size) if m.spatial_size else "any"
            print(f"  {m.name + ' ' + m.version:24} OK      {m.task}, {len(m.labels)} labels, "
                  f"input {size}, {_SOURCES.get(m.source, m.source)} on {m.device}, "
                  f"{took:.1f} s")
            for note in runner.notes.get(spec.name, []):  # what it will not do (no heatmap)
                print(f"  {'':24} note    {note}")
            for name, why in runner.mismatched().items():  # its jobs would all fail
                failed += 1
                print(f"  {'pipeline ' + name:24} FAILED  {why}")
        finally:
            runner.close()
    return 1 if failed else 0


def _serve(settings: Settings) -> int:
    from dicom_node.logs import configure_logging
    from dicom_node.memory import limit_arenas
    from dicom_node.node import Node

    configure_logging(settings.logging.level, settings.logging.format)
    limit_arenas()  # before any thread starts: see dicom_node.memory
    # Before any file is made: results and reports were world-readable under the usual
    # umask 022 (received instances, the store and the secret are 0600 regardless).
    os.umask(int(settings.storage.umask, 8))
    node = Node(settings, freeze_startup_objects=True)
    try:
        asyncio.run(node.run())
    except OSError as exc:  # a port in use, a data directory we cannot write
        node.log.error("cannot start", error=str(exc))
        print(f"dicom-node: cannot start: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except NodeError as exc:
        node.log.error("cannot start", error=str(exc))
        print(f"dicom-node: cannot start: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return 0


def _open_store(settings: Settings, *, older_ok: bool = False) -> Any:
    """The node's store, for the commands that read it: an SQLite file that does not exist
    is an error (it was made empty in the wrong folder, and 'no jobs' was the answer).

    Never migrated: only ``serve`` upgrades a store, since an older node may still run
    on it (and the upgrade is one way). A store older than this program is refused
    (NodeError) unless ``older_ok`` (the caller reads only what older schemas have).
    """
    from sqlalchemy.engine import make_url

    from dicom_node.store import SCHEMA_VERSION, Store

    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        db = Path(url.database)
        if not db.is_file():
            raise NodeError(f"no store at {db.resolve()}: no node has run with this data "
                            "directory (give --data-dir or --config as for serve)")
    store = Store(settings.database_url).open(migrate=False)
    if not older_ok:
        found = store.schema_version()
        if found < SCHEMA_VERSION:
            store.close()
            raise NodeError(_older_store(store, found))
    return store


def _older_store(store: Any, found: int) -> str:
    from sqlalchemy.engine import make_url

    from dicom_node.store import SCHEMA_VERSION

    where = make_url(store.url).render_as_string()  # a password as ***
    if found == 0:
        return (f"no node has set up the store at {where} yet; `dicom-node serve` creates "
                "its schema")
    return (f"the store at {where} has schema version {found}; this version uses "
            f"{SCHEMA_VERSION}. `dicom-node serve` of this version upgrades it (one way: "
            "older versions then refuse it); until then use the older version's commands")


def _config_objects(store: Any) -> dict[str, dict[str, dict[str, Any] | None]]:
    """The config API's objects, from a store of any schema (the table came in
    version 2 and has not changed since)."""
    if store.schema_version() < 2:
        return {}
    objects: dict[str, dict[str, dict[str, Any] | None]] = store.config_objects()
    return objects


JOBS_LIST_MAX = 1000  # rows a `jobs list` prints at most; narrow it down with --state
STUDIES_LIST_MAX = 1000  # the same for `studies list` (each row reads its series too)


def _list_limit(what: str, narrow: str) -> Callable[[str], int]:
    """An argparse type for a list's ``--limit``: 1 to the list's maximum, so that a
    slip of the keyboard does not read a store of millions of rows into memory."""
    top = JOBS_LIST_MAX if what == "jobs" else STUDIES_LIST_MAX

    def limit(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not 1 <= n <= top:
            raise argparse.ArgumentTypeError(
                f"{n} is not between 1 and {top}: list at most {top} {what} at a time "
                f"(narrow it down with {narrow})")
        return n

    return limit


_jobs_list_limit = _list_limit("jobs", "--state")


def _jobs(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_node.store import JobState
    from dicom_node.studies_view import clip, column_width

    store = _open_store(settings)
    try:
        if args.jobs_command == "list":
            states = [JobState(s) for s in args.state] if args.state else None
            rows = store.list_jobs(states, limit=args.limit, with_input=False)
            if args.json:
                for job in rows:
                    print(json.dumps(_job_json(job)))
                return 0
            if not rows:
                print("no jobs")
                return 0
            pipe_w = column_width("PIPELINE", (job.pipeline for job in rows), 32)
            head = (f"{'JOB ID':36}  {'STATE':10}  {'PRI':>3}  {'TRY':>3}  "
                    f"{'PIPELINE':{pipe_w}}  {'CREATED':20}  ")
            # Clipped to a terminal's width; whole when piped (grep, less -S).
            room = (max(30, shutil.get_terminal_size().columns - len(head))
                    if sys.stdout.isatty() else 100_000)
            print(f"{head}OUTCOME")
            for job in rows:
                print(f"{job.id:36}  {job.state.value:10}  {job.priority:>3}  "
                      f"{job.attempts:>3}  {clip(job.pipeline, pipe_w):{pipe_w}}  "
                      f"{job.created_at:%Y-%m-%d %H:%M:%S}Z  "
                      f"{clip(_outcome(job), room)}".rstrip())
            return 0
        job_id = args.job_id
        if args.jobs_command == "show":
            job = store.match_job(job_id)
            data = _job_json(job)
            data["events"] = [{"at": e.at.isoformat(), "state": e.state.value,
                               "message": e.message} for e in store.events(job.id)]
            data["artifacts"] = [{"kind": a.kind, "path": a.path, "media_type": a.media_type}
                                 for a in store.artifacts_of(job.id)]
            data["exports"] = [{"destination": x.destination, "state": x.state,
                                "attempts": x.attempts, "sent": x.sent, "message": x.message}
                               for x in store.exports_of(job.id)]
            if args.json:
                print(json.dumps(data, indent=2))
            else:
                _print_job(data)
            return 0
        if args.jobs_command == "cancel":
            job = store.request_cancel(store.match_job(job_id).id)
            done = job.state is JobState.CANCELLED
            print(f"{job.id}: {'cancelled' if done else 'cancel requested'}")
            return 0
        if args.jobs_command == "retry":
            before = store.match_job(job_id)
            job = store.retry(before.id)
            # a job of a study's group runs on all of the study the node holds now
            had, has = (len(j.input.get("instances") or []) for j in (before, job))
            grew = f" with {has} instances, {has - had} more than the failed run" \
                if has > had else ""
            print(f"{job.id}: queued again{grew}")
            return 0
    finally:
        store.close()
    return EXIT_CONFIG


def _studies(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_node import studies_view

    store = _open_store(settings)
    try:
        if args.studies_command == "list":
            return studies_view.list_studies(store, limit=args.limit, patient_id=args.patient,
                                             as_json=args.json)
        if args.studies_command == "delete":
            return studies_view.delete_study(settings, store, args.study, results=args.results,
                                             yes=args.yes)
        return studies_view.show_study(store, args.study, as_json=args.json)
    finally:
        store.close()


def _outcome(job: Any) -> str:
    """One line on how a job ended: its error, its handler's summary or what it produced."""
    if job.error:
        return str(job.error)
    result = job.result or {}
    if result.get("outcome"):
        return str(result["outcome"])
    if "artifacts" in result:
        exports = result.get("exports", 0)
        return f"{result['artifacts']} artifacts" + (f", {exports} exports" if exports else "")
    return ""



def _job_json(job: Any) -> dict[str, Any]:
    def ts(v: Any) -> str | None:
        return v.isoformat() if v else None

    return {
        "id": job.id, "state": job.state.value, "pipeline": job.pipeline, "kind": job.kind,
        "priority": job.priority, "attempts": job.attempts, "max_attempts": job.max_attempts,
        "study_instance_uid": job.study_instance_uid, "called_ae": job.called_ae,
        "calling_ae": job.calling_ae, "transaction_id": job.transaction_id,
        "created_at": ts(job.created_at), "started_at": ts(job.started_at),
        "finished_at": ts(job.finished_at), "error": job.error, "result": job.result,
    }


def _print_job(d: dict[str, Any]) -> None:
    for key in ("id", "state", "pipeline", "kind", "priority", "attempts", "study_instance_uid",
                "called_ae", "calling_ae", "transaction_id", "created_at", "started_at",
                "finished_at", "error"):
        if d.get(key) not in (None, ""):
            print(f"{key:20} {d[key]}")
    print("history:")
    for e in d["events"]:
        print(f"  {e['at']}  {e['state']:10}  {e['message'] or ''}")
    if d["artifacts"]:
        print("artifacts:")
        for a in d["artifacts"]:
            print(f"  {a['kind']:16} {a['path']}")
    if d["exports"]:
        print("exports:")
        for x in d["exports"]:
            print(f"  {x['destination']:16} {x['state']:10} sent {x['sent']} in "
                  f"{x['attempts']} attempts  {x['message'] or ''}")


def _echo(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import asdict

    from dicom_node.logs import configure_logging
    from dicom_node.reachability import EchoOutcome, check_destination, check_source
    from dicom_node.scu import DicomClient
    from dicom_node.studies_view import clip, column_width

    configure_logging("error", "auto", stream="stderr")  # stdout is the table
    # pynetdicom's own lines ("Unknown PDU type received '0x48'" from a port that is not
    # DICOM) would come before the table saying the same for each peer
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    settings = _with_runtime_objects(settings)
    sources = [s for s in settings.sources if not args.names or s.name in args.names]
    dests = [d for d in settings.destinations if not args.names or d.name in args.names]
    known = {s.name for s in settings.sources} | {d.name for d in settings.destinations}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        raise UsageError(f"no source or destination named {', '.join(map(repr, unknown))}; "
                         f"configured: {', '.join(sorted(known)) or 'none'}")
    if not sources and not dests:
        print("no sources or destinations are configured")
        return 0
    client = DicomClient(settings)
    checks: list[tuple[str, EchoOutcome]] = []
    for src in sources:
        checks += [("source", o) for o in check_source(client, src)]
    for dest in dests:
        checks.append(("destination", check_destination(settings, client, dest)))
    name_w = column_width("", (o.destination for _, o in checks), 32)
    target_w = column_width("", (o.target for _, o in checks), 64)
    for role, o in checks:
        if args.json:
            print(json.dumps({"role": role, **asdict(o)}))
        else:
            print(f"{'ok  ' if o.success else 'FAIL'}  {role:11}  "
                  f"{clip(o.destination, name_w):{name_w}}  {o.type:8}  "
                  f"{clip(o.target, target_w):{target_w}}  {o.round_trip_ms:7.1f} ms  "
                  f"{o.message}")
    return 0 if all(o.success for _, o in checks) else EXIT_RUNTIME


def _with_runtime_objects(settings: Settings) -> Settings:
    """The settings merged with what the config API stored, as the node would run them
    (left as they are when there is no store yet)."""
    from dicom_node import runtime_config

    url = settings.database_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return settings
    store = _open_store(settings, older_ok=True)  # reads only the config API's objects
    try:
        if store.schema_version() < 2:
            return settings
        return runtime_config.with_stored(settings, store)[0]
    finally:
        store.close()


def _infer(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    from dicom_node.infer import DEFAULT_OUT, run_infer
    from dicom_node.logs import configure_logging

    # Warnings (a trace refused, a model that failed) on stderr: stdout is the results.
    configure_logging("warning", "auto", stream="stderr")
    # Files that are not DICOM are counted and named in the summary instead.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    return run_infer(settings, args.path, args.model, args.out or DEFAULT_OUT,
                     device=args.device, as_json=args.json)


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``8h``, ``30d`` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise NodeError(f"--expires: {text!r} is not a duration like 900, 15m or 8h") from None
    if value <= 0:
        raise NodeError("--expires must be positive")
    return int(value)


def _token(args: argparse.Namespace, settings: Settings) -> int:
    import jwt

    from dicom_node.secrets import read_jwt_secret

    if "HS256" not in settings.auth.algorithms:
        raise NodeError("this node verifies tokens with a public key; mint them where the "
                        "private key is")
    secret = read_jwt_secret(settings.jwt_secret_file)
    now = int(time.time())
    lifetime = parse_duration(args.expires)
    claims: dict[str, Any] = {"sub": args.subject, "iat": now, "exp": now + lifetime,
                              "scope": " ".join(args.scope or ["infer", "read"])}
    if args.group:
        claims["group"] = args.group
    if args.project:
        # digits name a project by its integer id, as `projects: [2]` does in the config
        claims["projects"] = list(dict.fromkeys(
            int(p) if p.isascii() and p.isdigit() else p for p in args.project))
    if settings.auth.audience:
        claims["aud"] = settings.auth.audience
    if settings.auth.issuer:
        claims["iss"] = settings.auth.issuer
    token = jwt.encode(claims, secret, algorithm="HS256")
    print(f"# scopes: {claims['scope']}"
          + (f"; group: {args.group}" if args.group else "")
          + (f"; projects: {', '.join(map(str, claims['projects']))}" if args.project else "")
          + f"; expires in {lifetime} s "
          f"({time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(claims['exp']))})", file=sys.stderr)
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
