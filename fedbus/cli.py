"""`fedbus` command line: one sub-command per role, plus local tooling."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from fedbus.allocator import prefer_huge_pages

prefer_huge_pages()  # before torch's first allocation: its huge-page switch is read once

DEFAULT_NATS = "nats://127.0.0.1:4222"
USAGE_ERROR = 2  # exit code for bad input files and arguments (argparse uses it too)
# A job that ends by its own rule exits 0: all rounds done, or stopped before a round that would
# exceed the privacy budget (rounds.PRIVACY_BUDGET_EXHAUSTED). Anything else exits 3.
CLEAN_FINISH = frozenset({"completed", "privacy_budget_exhausted"})
_MAX_ERRORS_SHOWN = 5

KEY_HELP = ("private key file; must be readable by its owner only (`chmod 600 FILE`): a key file that group or "
            "others can access is refused, unless FEDBUS_ALLOW_INSECURE_KEYS=1 (then only a warning)")


class CliError(Exception):
    """A problem the user can fix (bad job spec, federation or key file): one line on stderr, exit code 2."""


def _env_nats() -> str:
    return os.environ.get("FEDBUS_NATS_URL") or os.environ.get("NATS_URL") or DEFAULT_NATS


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """The server URL and the credentials, the same on every command that connects to NATS.

    Option names and environment variables are the NATS CLI's (`nats --tlsca ... --creds
    ...`), so one shell environment serves both tools. Only paths are taken: secrets stay
    in their files and never reach argv, logs or summary.json."""
    from fedbus.bus.credentials import ENV_CA, ENV_CERT, ENV_CREDS, ENV_KEY, ENV_NKEY

    parser.add_argument("--nats", default=_env_nats(),
                        help="NATS URL, comma-separated for a cluster (env FEDBUS_NATS_URL, then NATS_URL)")
    g = parser.add_argument_group("NATS credentials (file paths)")
    g.add_argument("--tlsca", "--tls-ca", dest="tls_ca", default=os.environ.get(ENV_CA) or None, metavar="FILE",
                   help=f"CA certificate that signed the server's certificate: connect with TLS (env {ENV_CA})")
    g.add_argument("--tlscert", "--tls-cert", dest="tls_cert", default=os.environ.get(ENV_CERT) or None,
                   metavar="FILE", help=f"client certificate for mutual TLS (env {ENV_CERT}); needs --tlskey")
    g.add_argument("--tlskey", "--tls-key", dest="tls_key", default=os.environ.get(ENV_KEY) or None, metavar="FILE",
                   help=f"private key of --tlscert (env {ENV_KEY})")
    g.add_argument("--creds", default=os.environ.get(ENV_CREDS) or None, metavar="FILE",
                   help=f"NATS .creds file: user JWT and nkey seed (env {ENV_CREDS})")
    g.add_argument("--nkey", default=os.environ.get(ENV_NKEY) or None, metavar="FILE",
                   help=f"file holding a user nkey seed (SU...) (env {ENV_NKEY}); `fedbus nats nkey` writes one")


def add_metrics_options(parser: argparse.ArgumentParser) -> None:
    """Where a service serves its Prometheus ``/metrics`` (the README lists the series)."""
    g = parser.add_argument_group("metrics (Prometheus)")
    g.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve /metrics on this port (0: any free port, logged as metrics.serving); default: off")
    g.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDR",
                   help="address /metrics binds to (default 127.0.0.1: only this machine can scrape)")


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def byte_size(text: str) -> int:
    """A byte count: an integer, optionally with K, M, G or T (powers of 1024; ``512M``, ``2GiB``)."""
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = raw[-1:] if raw[-1:] in _SIZE_UNITS else ""
    number = raw[: len(raw) - len(unit)].strip()
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count (e.g. 0, 268435456, 512M, 2G)")
    return int(number) * _SIZE_UNITS[unit]


def optional_byte_size(text: str) -> int | None:
    """``byte_size``, or None for "off"."""
    return None if text.strip().lower() == "off" else byte_size(text)


def add_spill_options(parser: argparse.ArgumentParser, default_dir: str) -> None:
    g = parser.add_argument_group("spilling buffered robust rules (docs/data-path.md)")
    g.add_argument("--spill-above", type=byte_size, default=None, metavar="BYTES",
                   help="a robust rule (median, trimmed_mean, krum, bulyan, geometric_median, with nnm or bucketing) "
                        "keeps up to BYTES of a round's updates in memory and the rest in an unlinked memory-mapped "
                        "file (page cache the kernel can drop and re-read); 0 spills every update, 512M, 2G; "
                        "default: off")
    g.add_argument("--spill-dir", metavar="DIR",
                   help=f"where the spill files go: a directory on a disk, not tmpfs (default {default_dir})")


def configure_spill_from(args: argparse.Namespace, default_dir: Path) -> None:
    """Apply --spill-above/--spill-dir to this process (fedbus/spill.py); CliError if unusable."""
    if args.spill_above is None:
        if args.spill_dir:
            raise CliError("--spill-dir needs --spill-above BYTES")
        return
    from fedbus.spill import configure_spill

    directory = Path(args.spill_dir) if args.spill_dir else default_dir
    try:
        configure_spill(directory, args.spill_above)
    except OSError as exc:
        raise CliError(f"--spill-dir {directory}: {_describe(exc)}") from None


def credentials_from(args: argparse.Namespace):
    """The NatsCredentials the options (or their environment variables) name; CliError if
    they are inconsistent or a file is missing."""
    from fedbus.bus.credentials import NatsCredentials

    try:
        credentials = NatsCredentials(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, creds=args.creds,
                                      nkey=args.nkey)
        credentials.check_files()
    except ValueError as exc:
        raise CliError(f"NATS credentials: {_describe(exc)}") from None
    return credentials


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe_validation_error(exc: Any) -> str:
    """A pydantic ValidationError as one line: ``field.path: message; ...``."""
    parts = []
    for err in exc.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {msg}" if where else msg)
    shown = parts[:_MAX_ERRORS_SHOWN]
    if len(parts) > len(shown):
        shown.append(f"(and {len(parts) - len(shown)} more)")
    return _one_line("; ".join(shown))


def _describe(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return describe_validation_error(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # the path is already in the CLI's message
    return _one_line(str(exc)) or type(exc).__name__


def _config_errors() -> tuple[type[BaseException], ...]:
    import yaml

    # ValueError covers pydantic's ValidationError and the key loader's errors.
    return (OSError, ValueError, TypeError, yaml.YAMLError)


def load_job(path: str):
    from fedbus.jobspec import JobSpec

    try:
        return JobSpec.load(path)
    except _config_errors() as exc:
        raise CliError(f"job spec {path}: {_describe(exc)}") from None


def load_federation(path: str):
    from fedbus.crypto.federation import Federation

    try:
        return Federation.load(path)
    except _config_errors() as exc:
        raise CliError(f"federation file {path}: {_describe(exc)}") from None


def load_identity(path: str | Path):
    from fedbus.crypto.keys import Identity

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            identity = Identity.load(path)
        except _config_errors() as exc:
            # The key loader's messages already start with the path.
            detail = _describe(exc)
            raise CliError(detail if detail.startswith(str(path)) else f"key file {path}: {detail}") from None
    for warning in caught:
        print(f"fedbus: warning: {_one_line(str(warning.message))}", file=sys.stderr)
    return identity


def _interrupt(sig: signal.Signals, task: asyncio.Task) -> None:
    """Stop the service; first log what it was waiting on, so a stop after a hang explains it."""
    import structlog

    from fedbus.telemetry.stacks import waiting_on

    structlog.get_logger("fedbus.cli").warning("service.interrupted", signal=sig.name, waiting_on=waiting_on())
    task.cancel()


def _run_service(coro_factory, *, process: str, service: str, instance: str, span_file: str | None,
                 args: argparse.Namespace | None = None, job: str = "") -> int:
    """Run one role's service with logging, tracing, metrics (``--metrics-port`` in ``args``)
    and clean shutdown on SIGTERM/SIGINT."""
    from fedbus.telemetry import configure_logging, setup_tracing, shutdown_tracing
    from fedbus.telemetry.metrics import serve_metrics, shutdown_metrics

    configure_logging(process=process)
    port = getattr(args, "metrics_port", None)
    if port is not None:
        if not 0 <= port <= 65535:
            raise CliError(f"--metrics-port {port}: not a port number")
        try:
            serve_metrics(service, instance=instance, job=job, port=port, host=args.metrics_host)
        except OSError as exc:
            raise CliError(f"--metrics-port {port}: cannot serve on {args.metrics_host}: {_describe(exc)}") from None
    setup_tracing(service, span_file=span_file, instance=instance)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _interrupt, sig, task)
        return await coro_factory()

    try:
        return asyncio.run(main()) or 0
    except asyncio.CancelledError:
        return 130
    finally:
        shutdown_tracing()
        shutdown_metrics()


@contextlib.contextmanager
def _sealing_errors():
    """security.seal_updates: true with a recipient that has no encryption key is bad input."""
    from fedbus.crypto.sealing import SealingUnavailable

    try:
        yield
    except SealingUnavailable as exc:
        raise CliError(str(exc)) from None


def cmd_coordinator(args: argparse.Namespace) -> int:
    # Every input file is checked before anything is created or imported heavily.
    job = load_job(args.job)
    federation = load_federation(args.federation)
    identity = load_identity(args.key)
    credentials = credentials_from(args)

    import torch

    from fedbus.coordinator.service import CoordinatorService

    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir or f"runs/{job.job}")
    run_dir.mkdir(parents=True, exist_ok=True)
    configure_spill_from(args, run_dir / "spill")
    span_file = args.span_file or str(run_dir / "spans.jsonl")
    with _sealing_errors():
        service = CoordinatorService(job, federation, identity, args.nats, run_dir, resume=args.resume,
                                     credentials=credentials, span_file=span_file, page_out_above=args.page_out_above)

    async def go() -> int:
        summary = await service.run()
        if service.already_done:
            return 0  # resumed a job that had finished: nothing to do, results untouched
        if service.exit_code:
            return service.exit_code
        return 0 if summary.reason in CLEAN_FINISH else 3

    return _run_service(go, process="coordinator", service="fedbus-coordinator", instance=identity.id,
                        span_file=span_file, args=args, job=job.job)


def cmd_aggregator(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    federation = load_federation(args.federation)
    identity = load_identity(args.key)
    if args.id and args.id != identity.id:
        raise CliError(f"--id {args.id} does not match the key file's id {identity.id}")
    if job.topology != "regional":
        raise CliError(f"job {job.job} has topology: {job.topology}; aggregators serve topology: regional")
    credentials = credentials_from(args)

    import torch

    from fedbus.aggregator.service import AggregatorService

    torch.set_num_threads(args.threads)
    # A region_strategy may be a robust rule, buffered like the coordinator's.
    configure_spill_from(args, Path(tempfile.gettempdir()))
    try:
        service = AggregatorService(job, federation, identity, args.region, args.nats, credentials=credentials)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return _run_service(service.run, process=f"aggregator:{args.region}", service="fedbus-aggregator",
                        instance=identity.id, span_file=args.span_file, args=args, job=job.job)


def cmd_worker(args: argparse.Namespace) -> int:
    if args.key_dir or args.ids:
        return cmd_worker_pool(args)
    if not args.key:
        raise CliError("worker: --key is required (or --key-dir with --ids for a worker pool)")
    job = load_job(args.job)
    federation = load_federation(args.federation)
    identity = load_identity(args.key)
    if args.id and args.id != identity.id:
        raise CliError(f"--id {args.id} does not match the key file's id {identity.id}")
    credentials = credentials_from(args)
    slowdown = None
    if args.simulate_slowdown is not None:
        from fedbus.worker.slowdown import Slowdown

        try:
            slowdown = Slowdown.parse(args.simulate_slowdown)
        except ValueError as exc:
            raise CliError(f"--simulate-slowdown: {exc}") from None

    import torch

    from fedbus.worker.service import WorkerService

    # Many workers share a machine in local runs; one intra-op thread each avoids oversubscription.
    torch.set_num_threads(args.threads)
    attack = None
    if args.simulate_attack:
        from fedbus.worker.attacks import Attack

        attack = Attack.parse(args.simulate_attack, seed=args.attack_seed)
        print(f"WARNING: worker {identity.id} simulates the attack {args.simulate_attack!r} (testing only)",
              file=sys.stderr)
    if slowdown is not None:
        print(f"WARNING: worker {identity.id} simulates a straggler: training stretched {slowdown.factor:g}x "
              f"(testing only)", file=sys.stderr)
    dropout = None
    if args.simulate_dropout:
        from fedbus.worker.secure import SimulatedDropout

        try:
            dropout = SimulatedDropout.parse(args.simulate_dropout)
        except ValueError as exc:
            raise CliError(f"--simulate-dropout: {exc}") from None
        print(f"WARNING: worker {identity.id} simulates a {'silence' if dropout.silent else 'crash'} before its "
              f"secure-aggregation {dropout.phase} message of round {dropout.round} (testing only)", file=sys.stderr)
    with _sealing_errors():
        service = WorkerService(job, federation, identity, args.nats, partition=args.partition, attack=attack,
                                state_dir=args.state_dir, slowdown=slowdown, credentials=credentials,
                                dropout=dropout)
    return _run_service(service.run, process=f"worker:{identity.id}", service="fedbus-worker",
                        instance=identity.id, span_file=args.span_file, args=args, job=job.job)


def pool_identities(key_dir: str, ids_text: str | None) -> list:
    """The hosted workers' keys: DIR/<id>.key for each of --ids, else every worker key in DIR."""
    from fedbus.worker.pool import MAX_POOL, PoolError, parse_ids

    directory = Path(key_dir)
    if not directory.is_dir():
        raise CliError(f"--key-dir {key_dir}: not a directory")
    if ids_text:
        try:
            ids = parse_ids(ids_text)
        except PoolError as exc:
            raise CliError(f"--ids: {exc}") from None
        identities = []
        for wid in ids:
            path = directory / f"{wid}.key"
            if not path.is_file():
                raise CliError(f"--ids: no key file {path}")
            identity = load_identity(path)
            if identity.id != wid:
                raise CliError(f"{path} holds the key of {identity.id}, not {wid}")
            identities.append(identity)
    else:
        paths = sorted(directory.glob("*.key"))[:MAX_POOL + 1]
        identities = [i for i in (load_identity(p) for p in paths) if i.role == "worker"]
    if not identities:
        raise CliError(f"--key-dir {key_dir}: no worker key files")
    if len(identities) > MAX_POOL:
        raise CliError(f"--key-dir {key_dir}: more than {MAX_POOL} worker keys")
    return identities


def cmd_worker_pool(args: argparse.Namespace) -> int:
    """fedbus worker --key-dir DIR [--ids ...]: many logical workers in one process (testing aid)."""
    if not args.key_dir:
        raise CliError("worker: --ids needs --key-dir (where <id>.key files are)")
    single = {"--key": args.key, "--id": args.id, "--partition": args.partition,
              "--simulate-attack": args.simulate_attack, "--simulate-slowdown": args.simulate_slowdown,
              "--simulate-dropout": args.simulate_dropout}
    clash = [name for name, value in single.items() if value is not None]
    if clash:
        raise CliError(f"worker pool (--key-dir): {', '.join(clash)} applies to a single worker")
    job = load_job(args.job)
    federation = load_federation(args.federation)
    identities = pool_identities(args.key_dir, args.ids)
    credentials = credentials_from(args)

    import torch

    from fedbus.worker.pool import PoolError, WorkerPool

    torch.set_num_threads(args.threads)
    try:
        with _sealing_errors():
            pool = WorkerPool(job, federation, identities, args.nats, state_root=args.state_dir,
                              credentials=credentials)
    except (PoolError, ValueError) as exc:
        raise CliError(f"worker pool: {_describe(exc)}") from None
    print(f"NOTE: one process hosts {len(identities)} workers ({identities[0].id} ... {identities[-1].id}): "
          f"a testing and simulation aid", file=sys.stderr)
    first = identities[0].id
    return _run_service(pool.run, process=f"worker-pool:{first}+{len(identities) - 1}", service="fedbus-worker",
                        instance=f"pool-{first}", span_file=args.span_file, args=args, job=job.job)


def cmd_secure_sum_server(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    federation = load_federation(args.federation)
    identity = load_identity(args.key)
    from fedbus.secagg.service import SecureSumServer
    from fedbus.secagg.spec import SecureAggregationSpec

    roster = args.workers or [w.id for w in federation.workers() if not w.revoked]
    try:
        spec = SecureAggregationSpec(threshold=args.threshold, degree=args.degree, scale=args.scale)
        server = SecureSumServer(job, federation, identity, round=args.round, roster=roster, length=args.length,
                                 bound=args.bound, spec=spec, phase_timeout_s=args.phase_timeout,
                                 join_timeout_s=args.join_timeout, out_dir=Path(args.out))
    except ValueError as exc:
        raise CliError(f"secure-sum: {_describe(exc)}") from None
    return _run_service(lambda: server.run(args.nats, credentials_from(args)), process="secure-sum-server", service="fedbus-secure-sum",
                        instance=identity.id, span_file=None)


def cmd_secure_sum_worker(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    federation = load_federation(args.federation)
    identity = load_identity(args.key)
    import numpy as np

    from fedbus.secagg.service import SecureSumWorker

    try:
        values = np.load(args.input, allow_pickle=False)
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.number) or not np.isfinite(values).all():
            raise ValueError("must be a one-dimensional array of finite numbers")
        worker = SecureSumWorker(job, federation, identity, round=args.round, values=values.astype(np.float64),
                                 timeout_s=args.timeout, dropout_before=args.simulate_dropout)
    except (OSError, ValueError) as exc:
        raise CliError(f"secure-sum worker: {args.input}: {_describe(exc)}") from None
    if args.simulate_dropout:
        print(f"WARNING: worker {identity.id} simulates a crash before sending its {args.simulate_dropout} message "
              f"(testing only)", file=sys.stderr)
    return _run_service(lambda: worker.run(args.nats, credentials_from(args)), process=f"secure-sum:{identity.id}",
                        service="fedbus-secure-sum", instance=identity.id, span_file=None)


def cmd_keys_gen(args: argparse.Namespace) -> int:
    from fedbus.crypto.keys import Identity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.id}.key"
    if path.exists() and not args.force:
        print(f"error: {path} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    identity = Identity.generate(args.id, args.role, args.region)
    identity.save(path)
    print(f"wrote {path} (private, mode 600); public entry:")
    import yaml

    print(yaml.safe_dump([identity.participant_entry()], sort_keys=False), end="")
    return 0


def cmd_keys_federation(args: argparse.Namespace) -> int:
    from fedbus.crypto.federation import Federation, FederationFile, Participant

    keys = sorted(Path(args.keys).glob("*.key"))
    if not keys:
        print(f"error: no *.key files in {args.keys}", file=sys.stderr)
        return 2
    order = {"coordinator": 0, "operator": 1, "aggregator": 2, "worker": 3}
    entries = sorted((load_identity(k).participant_entry() for k in keys), key=lambda e: (order[e["role"]], e["id"]))
    try:
        spec = FederationFile(federation=args.name, participants=[Participant(**e) for e in entries])
    except _config_errors() as exc:
        raise CliError(f"keys in {args.keys}: {_describe(exc)}") from None
    Federation(spec).dump(args.out)
    print(f"wrote {args.out} with {len(entries)} participants (public keys only)")
    return 0


def cmd_keys_event(args: argparse.Namespace) -> int:
    """fedbus keys revoke|rotate: publish a signed key event and wait for JetStream's ack."""
    from fedbus.keytool import KeyToolError, job_subjects, send_key_event

    federation = load_federation(args.federation)
    signer = load_identity(args.key)
    new_key = load_identity(args.new_key) if getattr(args, "new_key", None) else None
    try:
        subjects, security = job_subjects(args.job, args.prefix, load_job)
        seq, event = asyncio.run(send_key_event(args.nats, subjects, security, federation, signer, args.participant,
                                                new_key=new_key, reason=args.reason,
                                                credentials=credentials_from(args)))
    except (KeyToolError, ValueError) as exc:
        raise CliError(_describe(exc)) from None
    print(f"{event.action}: {event.participant} in job {subjects.job} (key event #{seq}, signed by {signer.id})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """fedbus models list|show|export|verify|tag|rollback (fedbus.registry.tool)."""
    import json

    from fedbus.keytool import KeyToolError, job_subjects
    from fedbus.registry import tool
    from fedbus.telemetry.logging import configure_logging

    configure_logging(process="models", level=os.environ.get("FEDBUS_LOG_LEVEL", "error"))  # stderr: stdout is data
    federation = load_federation(args.federation)
    credentials = credentials_from(args)
    try:
        subjects, _ = job_subjects(args.job, args.prefix, load_job)
    except KeyToolError as exc:
        raise CliError(str(exc)) from None
    common = (args.nats, subjects, federation)
    try:
        match args.models_command:
            case "list":
                lines = asyncio.run(tool.list_versions(*common, credentials=credentials))
                print("\n".join(lines) if lines else f"job {subjects.job}: no versions in the registry")
            case "show":
                print(json.dumps(asyncio.run(tool.show_version(*common, args.version, credentials=credentials)),
                                 indent=2))
            case "export":
                manifest, written = asyncio.run(tool.export_version(*common, args.version, Path(args.out),
                                                                    credentials=credentials))
                print(f"exported v{manifest.version} ({manifest.model_digest}, verified against its manifest): "
                      + ", ".join(map(str, written)))
            case "verify":
                manifest = asyncio.run(tool.verify_file(*common, args.version, Path(args.file),
                                                        credentials=credentials))
                print(f"{args.file}: matches v{manifest.version} ({manifest.model_digest})")
            case "tag":
                version = None if args.remove else args.version
                if version is None and not args.remove:
                    raise CliError("tag needs --version (or --remove)")
                asyncio.run(tool.tag_version(*common, load_identity(args.key), args.tag, version,
                                             credentials=credentials))
                print(f"tag {args.tag} removed" if args.remove else f"tagged v{version} as {args.tag}")
            case "rollback":
                manifest = asyncio.run(tool.rollback(*common, load_identity(args.key), args.version,
                                                     reason=args.reason, wait_s=args.wait, credentials=credentials))
                if manifest is None:
                    print(f"rollback to v{args.version} published")
                else:
                    print(f"rolled back: v{manifest.version} continues from v{manifest.parent_version} "
                          f"({manifest.model_digest})")
    except tool.ModelToolError as exc:
        print(f"fedbus models {args.models_command}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """fedbus status: a running job from the bus (fedbus.status), live on a terminal."""
    from fedbus.bus import Subjects
    from fedbus.jobspec import SecuritySpec
    from fedbus.status.command import NOTHING_COMMITTED, live, make_model, snapshot
    from fedbus.status.reader import StatusReader
    from fedbus.telemetry.logging import configure_logging

    configure_logging(process="status", level=os.environ.get("FEDBUS_LOG_LEVEL", "error"))  # stderr: stdout is the view
    job_spec = load_job(args.job) if Path(args.job).is_file() else None
    federation = load_federation(args.federation)
    credentials = credentials_from(args)
    if not 0 < args.listen <= 60:
        raise CliError(f"--listen {args.listen}: must lie in (0, 60] seconds")
    try:
        subjects = (Subjects(job_spec.job, prefix=job_spec.transport.prefix) if job_spec is not None
                    else Subjects(args.job, prefix=args.prefix))
    except ValueError as exc:
        raise CliError(f"--job {args.job!r} is neither a job spec file nor a valid job id: {_describe(exc)}") from None
    model = make_model(subjects.job, job_spec)
    reader = StatusReader(args.nats, subjects, federation, job_spec.security if job_spec else SecuritySpec(), model,
                          credentials=credentials, participant=args.id)
    once = args.once or not sys.stdout.isatty()
    try:
        if once:
            print(asyncio.run(snapshot(reader, args.listen)))
        else:
            asyncio.run(live(reader, exit_when_done=not args.keep))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # no server, refused credentials: nothing was shown
        print(f"fedbus status: cannot read job {subjects.job} at {args.nats}: {_describe(exc)}", file=sys.stderr)
        return 3
    return 0 if model.record is not None or not once else NOTHING_COMMITTED


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from fedbus.audit.reader import describe_verdict, verify_audit
    from fedbus.bus import Subjects, connect
    from fedbus.telemetry.logging import configure_logging

    configure_logging(process="audit-verify", level=os.environ.get("FEDBUS_LOG_LEVEL", "error"))  # stderr
    job_id, prefix = args.job, args.prefix
    if Path(args.job).is_file():  # a job spec: its id and subject prefix
        job = load_job(args.job)
        job_id, prefix = job.job, job.transport.prefix
    try:
        subjects = Subjects(job_id, prefix=prefix)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    federation = load_federation(args.federation) if args.federation else None

    async def go():
        nc = await connect(args.nats, name="fedbus-audit-verify", first_connect_timeout=10,
                           credentials=credentials_from(args))
        try:
            return await verify_audit(nc.jetstream(), subjects, federation)
        finally:
            await nc.close()

    try:
        verdict = asyncio.run(go())
    except Exception as exc:  # no server, no such stream: nothing was verified
        print(f"audit NOT VERIFIED: cannot read {subjects.audit_stream} at {args.nats}: {_describe(exc)}",
              file=sys.stderr)
        return 3
    print(describe_verdict(verdict))
    return 0 if verdict.ok else 1


def cmd_nats_up(args: argparse.Namespace) -> int:
    from fedbus.bus import run_foreground

    return run_foreground(Path(args.store_dir) if args.store_dir else None, args.port)


def cmd_nats_config(args: argparse.Namespace) -> int:
    from fedbus.bus.natsconfig import TlsFiles, read_nkeys, render
    from fedbus.bus.permissions import JobScope

    federation = load_federation(args.federation)
    jobs = [load_job(path) for path in args.job]
    scopes = [JobScope(j.job, j.transport.prefix, regional=j.topology == "regional") for j in jobs]
    if any(j.transport.hub_domain for j in jobs):
        raise CliError("jobs with transport.hub_domain (leaf nodes) are not covered: their JetStream API subjects "
                       "carry the domain; write those permissions by hand")
    if bool(args.server_cert) != bool(args.server_key):
        raise CliError("--server-cert and --server-key go together")
    if args.auth == "nkey" and not args.nkeys:
        raise CliError("--auth nkey needs --nkeys DIR (the participants' <id>.pub files)")
    tls = TlsFiles(args.server_cert, args.server_key, args.ca) if args.server_cert else None
    try:
        nkeys = read_nkeys(Path(args.nkeys)) if args.auth == "nkey" else None
        text = render(federation, scopes, auth=args.auth, tls=tls, listen=args.listen, store_dir=args.store_dir,
                      nkeys=nkeys)
    except (OSError, ValueError) as exc:
        raise CliError(f"nats config: {_describe(exc)}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / args.name
    from fedbus.atomicfile import atomic_write_text

    atomic_write_text(path, text)
    users = sum(1 for p in federation.spec.participants if not p.revoked)
    print(f"wrote {path}: {users} users ({args.auth}), jobs {', '.join(j.job for j in jobs)}")
    return 0


def cmd_nats_nkey(args: argparse.Namespace) -> int:
    import nkeys

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_path, pub_path = out / f"{args.id}.nk", out / f"{args.id}.pub"
    if seed_path.exists() and not args.force:
        raise CliError(f"{seed_path} exists (use --force to overwrite)")
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    # Created owner-only before the seed is written, so it is never readable by others.
    fd = os.open(seed_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(seed + b"\n")
    pub_path.write_text(public + "\n")
    print(f"wrote {seed_path} (secret: --nkey / NATS_NKEY) and {pub_path}: {public}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """fedbus report RUN_DIR: (re)build report.html from what the run directory holds."""
    from fedbus.report import write_report
    from fedbus.report.rundata import ReportInputError

    try:
        path = write_report(args.run_dir, span_file=args.span_file)
    except ReportInputError as exc:
        raise CliError(f"no report: {exc}") from None
    except OSError as exc:
        raise CliError(f"cannot write the report into {args.run_dir}: {_describe(exc)}") from None
    print(f"report: {path}")
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from fedbus.protocol import schemas

    if args.check:
        drift = schemas.check(args.out)
        for name in drift:
            print(f"drift: {name}")
        return 1 if drift else 0
    for path in schemas.write(args.out):
        print(f"wrote {path}")
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    import json

    from fedbus.atomicfile import atomic_write_json, json_safe

    job = load_job(args.job)

    import torch

    from fedbus.sim import SimSetupError, simulate
    from fedbus.worker.attacks import Attack

    torch.set_num_threads(args.threads)
    for flag, key, value in (("--rounds", "rounds", args.rounds), ("--mode", "mode", args.mode)):
        if value:
            try:  # validated like the file: --rounds 0 or 10**9 is as wrong here as there
                job = type(job).model_validate({**job.model_dump(by_alias=True), key: value})
            except ValueError as exc:
                raise CliError(f"{flag} {value}: {_describe(exc)}") from None
    if args.workers < 1:
        raise CliError(f"--workers {args.workers}: must be at least 1")
    attacks = {}
    for text in args.attack or []:
        index, _, kind = text.partition("=")
        try:
            attacks[int(index)] = Attack.parse(kind, seed=job.seed)
        except ValueError as exc:
            raise CliError(f"--attack {text}: {_describe(exc)}") from None

    from fedbus.progress import RunProgress

    display = RunProgress()  # a bar on a terminal, one line per round otherwise
    unit = "version" if job.mode == "async" else "round"
    display.add("rounds", job.rounds, f"{unit}s (virtual)")

    def show(row: dict) -> None:
        acc = row.get("test_accuracy")
        acc_text = "" if acc is None else f"test acc {acc:.4f}"
        display.update("rounds", min(int(row["model_version"]), job.rounds),
                       detail=f"{acc_text} at {row['elapsed_s']:.1f} s virtual",
                       line=f"round {row['round']}: {row['status']} v{row['model_version']} {acc_text} "
                            f"({row['accepted']} updates) at {row['elapsed_s']:.3f} s virtual")

    try:
        result = simulate(job, args.workers, attacks=attacks, stragglers=args.stragglers, slowdown=args.slowdown,
                          speeds=args.speeds, base_train_ms=args.train_ms, on_round=show)
    except SimSetupError as exc:
        raise CliError(str(exc)) from None
    finally:
        display.stop()
    summary = {"mode": job.mode, "workers": args.workers, **result.summary()}
    report = {"job": job.job, **summary, "speeds": args.speeds, "stragglers": args.stragglers,
              "slowdown": args.slowdown, "train_ms": args.train_ms, "rounds": result.rounds}
    # Strict JSON: a diverged run's nan loss is printed and written as null, not as NaN.
    print(json.dumps(json_safe(summary), allow_nan=False))
    if args.out:
        atomic_write_json(args.out, report)
    return 0 if result.reason in CLEAN_FINISH else 3


def cmd_demo(args: argparse.Namespace) -> int:
    if args.topology == "regional":
        if args.mode != "sync" or args.stragglers:
            raise CliError("--topology regional runs sync rounds without stragglers")
        from fedbus.demo_regional import run_regional_demo
        from fedbus.telemetry import configure_logging

        configure_logging(process="demo", level=os.environ.get("FEDBUS_LOG_LEVEL", "warning"))
        return run_regional_demo(args)
    from fedbus.demo import run_demo

    return run_demo(args)


def _secure_sum_common(parser: argparse.ArgumentParser, whose: str) -> None:
    parser.add_argument("--job", required=True, help="job spec YAML (job id, transport and security limits)")
    parser.add_argument("--federation", required=True)
    parser.add_argument("--key", required=True, help=f"{whose} " + KEY_HELP)
    add_connection_options(parser)
    parser.add_argument("--round", type=int, default=1, help="the round number both sides use")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedbus", description="Federated learning over NATS JetStream.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("coordinator", help="run the coordinator of a job")
    c.add_argument("--job", required=True, help="job spec YAML")
    c.add_argument("--federation", required=True, help="federation YAML (participants and public keys)")
    c.add_argument("--key", required=True, help="this coordinator's " + KEY_HELP)
    add_connection_options(c)
    c.add_argument("--run-dir", help="where summary.json, spans and the final model go (default runs/<job>)")
    c.add_argument("--span-file", help="JSONL span file (default <run-dir>/spans.jsonl)")
    c.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    c.add_argument("--resume", action="store_true",
                   help="continue the job from its last committed round (KV job state) instead of starting over")
    add_spill_options(c, "<run-dir>/spill")
    c.add_argument("--page-out-above", type=optional_byte_size, default="256M", metavar="BYTES",
                   help="a model of at least BYTES waits for its next use (the round's aggregation) in an unlinked "
                        "file under <run-dir>/spill, mapped, instead of anonymous memory: the coordinator then holds "
                        "about twice the model, not three times (docs/data-path.md); 'off' keeps it in memory "
                        "(default 256M)")
    add_metrics_options(c)
    c.set_defaults(func=cmd_coordinator)

    a = sub.add_parser("aggregator", help="run a region's aggregator (topology: regional)")
    a.add_argument("--job", required=True)
    a.add_argument("--federation", required=True)
    a.add_argument("--key", required=True, help="this aggregator's " + KEY_HELP)
    a.add_argument("--id", help="aggregator id (must match the key file)")
    a.add_argument("--region", required=True, help="the region it serves (must match its federation entry)")
    add_connection_options(a)
    a.add_argument("--span-file", help="JSONL span file (env FEDBUS_SPAN_FILE)")
    a.add_argument("--threads", type=int, default=1)
    add_spill_options(a, "the temporary directory, $TMPDIR or /tmp")
    add_metrics_options(a)
    a.set_defaults(func=cmd_aggregator)

    w = sub.add_parser("worker", help="run a worker (data holder), or a pool of logical workers (testing aid)",
                       description="Run one worker (--key), or, as a TESTING AND SIMULATION AID, a pool of many "
                                   "logical workers in one process (--key-dir, --ids): each hosted worker signs its "
                                   "own heartbeats and updates with its own key and is a participant like any other "
                                   "to the coordinator; they share one NATS connection, one training module and one "
                                   "verification of each control message. For load tests of the coordinator and "
                                   "the bus, not for deployment.")
    w.add_argument("--job", required=True)
    w.add_argument("--federation", required=True)
    w.add_argument("--key", help="this worker's " + KEY_HELP)
    w.add_argument("--id", help="worker id (must match the key file)")
    pool = w.add_argument_group("worker pool (TESTING AND SIMULATION AID)")
    pool.add_argument("--key-dir", metavar="DIR",
                      help="host many logical workers in this process, with the keys DIR/<id>.key (each must be "
                           "readable by its owner only); without --ids, every worker key in DIR")
    pool.add_argument("--ids", metavar="A,B,C",
                      help="the ids to host: comma-separated, ranges like w0001..w0250 allowed (at most 10,000)")
    add_connection_options(w)
    w.add_argument("--partition", type=int, help="data partition (default: position among the federation's workers)")
    w.add_argument("--span-file", help="JSONL span file (env FEDBUS_SPAN_FILE)")
    w.add_argument("--threads", type=int, default=1)
    w.add_argument("--state-dir", help="where this worker keeps its per-job state (sent updates, SCAFFOLD's c_i); "
                   "default .fedbus-state/<job>/<worker id> in the working directory (a pool: <state-dir>/<id>, "
                   "default .fedbus-state/<job>/<id>)")
    w.add_argument("--simulate-attack", metavar="KIND[:PARAM]",
                   help="TESTING ONLY: misbehave (sign_flip:K, scale:K, gaussian:SIGMA, label_flip)")
    w.add_argument("--attack-seed", type=int, default=0, help=argparse.SUPPRESS)
    w.add_argument("--simulate-slowdown", metavar="FACTOR",
                   help="TESTING ONLY: act as a straggler, stretching local training wall time FACTOR x "
                        "(1 <= FACTOR <= 1000)")
    add_metrics_options(w)
    w.add_argument("--simulate-dropout", metavar="PHASE@ROUND[:silent]",
                   help="TESTING ONLY: with privacy.secure_aggregation, crash (exit 17) just before sending the "
                        "PHASE message (advertise, shares, input, unmask) of round ROUND; with :silent, send "
                        "nothing more in that round instead and carry on (a link that dropped)")
    w.set_defaults(func=cmd_worker)

    ss = sub.add_parser("secure-sum", help="sum vectors over the bus with secure aggregation (SecAgg+): the "
                                           "server learns only the sum of the survivors' inputs")
    sssub = ss.add_subparsers(dest="secure_sum_role", required=True)
    sv = sssub.add_parser("server", help="run one round as the aggregating server (the job's coordinator key)")
    _secure_sum_common(sv, "the coordinator's")
    sv.add_argument("--length", type=int, required=True, help="values per worker")
    sv.add_argument("--bound", type=float, default=1.0, help="each value is clamped to [-bound, bound]")
    sv.add_argument("--workers", nargs="+", help="the workers summed (default: every worker of the federation)")
    sv.add_argument("--threshold", type=float, default=0.5,
                    help="fraction (0.5..1) of a worker's k + 1 share holders needed to rebuild its secrets")
    sv.add_argument("--degree", type=int, help="neighbours per worker (even; default min(n-1, 2*ceil(1.5*log2 n)))")
    sv.add_argument("--scale", type=float, default=65536.0, help="fixed-point steps per unit")
    sv.add_argument("--phase-timeout", type=float, default=30.0, help="seconds each phase waits for stragglers")
    sv.add_argument("--join-timeout", type=float,
                    help="seconds the first phase waits for workers to come online (default: --phase-timeout)")
    sv.add_argument("--out", required=True, help="directory for result.json and sum.npy")
    sv.set_defaults(func=cmd_secure_sum_server)
    sw = sssub.add_parser("worker", help="contribute one vector to a round")
    _secure_sum_common(sw, "this worker's")
    sw.add_argument("--input", required=True, help=".npy file with this worker's values")
    sw.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    sw.add_argument("--simulate-dropout", choices=("advertise", "shares", "input", "unmask"),
                    help="TESTING ONLY: crash just before sending this phase's message")
    sw.set_defaults(func=cmd_secure_sum_worker)

    d = sub.add_parser("demo", help="a whole local federation: nats-server, coordinator and workers")
    d.add_argument("--workers", type=int, default=10)
    d.add_argument("--rounds", type=int, default=None, help="default: the digits job's default")
    d.add_argument("--run-dir", help="default runs/demo-<timestamp>")
    d.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    d.add_argument("--mode", choices=["sync", "async"], default="sync",
                   help="sync: lock-step FedAvg rounds (default 20); async: FedBuff, buffer 5, "
                        "a model version per 5 updates (default 60 versions)")
    d.add_argument("--stragglers", type=int, default=0, metavar="N",
                   help="start the last N workers with --simulate-slowdown (testing only)")
    d.add_argument("--slowdown", type=float, default=10.0, metavar="F",
                   help="how much slower the stragglers train (default 10)")
    d.add_argument("--topology", choices=["flat", "regional"], default="flat",
                   help="regional: a hub and one leaf nats-server per region, an aggregator per region; the job runs "
                        "regional then flat on the same servers and the hub<->leaf bytes are compared")
    d.add_argument("--regions", type=int, default=2, help="regions of --topology regional (default 2)")
    d.add_argument("--hidden", type=int, default=None, metavar="UNITS",
                   help="hidden units of the digits MLP (default 128: ~38 KiB models sent inline; 2048: ~600 KiB "
                        "models and updates sent as claim checks)")
    d.add_argument("--keep-versions", type=int, default=None, metavar="N",
                   help="retention: newest model versions kept in the registry (default: the job spec's, 10)")
    d.set_defaults(func=cmd_demo)

    sm = sub.add_parser("sim", help="simulate a job in one process on a virtual clock (same round core and "
                                     "training code, no bus)")
    sm.add_argument("--job", required=True)
    sm.add_argument("--workers", type=int, required=True)
    sm.add_argument("--rounds", type=int, help="override the job's rounds")
    sm.add_argument("--mode", choices=("sync", "async"), help="override the job's mode")
    sm.add_argument("--stragglers", type=int, default=0, metavar="N",
                    help="the last N workers train --slowdown times slower (virtual time)")
    sm.add_argument("--slowdown", type=float, default=10.0, metavar="F",
                    help="how much slower the stragglers train (1 <= F <= 1000; default 10)")
    sm.add_argument("--speeds", default="uniform", metavar="uniform|lognormal:SIGMA",
                    help="every worker's training time factor: 1 (uniform) or exp(N(0, SIGMA)) drawn from the "
                         "job seed")
    sm.add_argument("--train-ms", type=int, default=1000, metavar="MS",
                    help="virtual milliseconds one local training takes at factor 1 (default 1000)")
    sm.add_argument("--attack", action="append", metavar="INDEX=KIND[:PARAM]",
                    help="TESTING ONLY: worker INDEX misbehaves, e.g. 0=sign_flip:5 (repeatable)")
    sm.add_argument("--out", help="write the per-round results as JSON")
    sm.add_argument("--threads", type=int, default=1)
    sm.set_defaults(func=cmd_sim)

    n = sub.add_parser("nats", help="NATS helpers")
    nsub = n.add_subparsers(dest="nats_command", required=True)
    up = nsub.add_parser("up", help="run an embedded nats-server with JetStream in the foreground")
    up.add_argument("--port", type=int, default=4222)
    up.add_argument("--store-dir", help="JetStream store directory (default: a temporary one)")
    up.set_defaults(func=cmd_nats_up)
    ncfg = nsub.add_parser("config", help="generate a nats-server configuration: a user per participant with "
                                        "least-privilege permissions derived from its role")
    ncfg.add_argument("--federation", required=True, help="federation YAML")
    ncfg.add_argument("--job", required=True, action="append", help="job spec YAML (repeatable: one per job served)")
    ncfg.add_argument("--out", required=True, help="directory for the configuration file")
    ncfg.add_argument("--name", default="nats-server.conf", help="file name (default nats-server.conf)")
    ncfg.add_argument("--auth", choices=["mtls", "nkey"], default="mtls",
                    help="mtls: client certificates with subject CN=<participant id> map to users (verify_and_map); "
                         "nkey: users are the nkey public keys in --nkeys")
    ncfg.add_argument("--nkeys", help="--auth nkey: directory of <id>.pub files (`fedbus nats nkey` writes them)")
    ncfg.add_argument("--server-cert", help="server certificate (path as the server sees it); required for mtls")
    ncfg.add_argument("--server-key", help="server certificate's key")
    ncfg.add_argument("--ca", help="CA that signs the participants' client certificates (mtls)")
    ncfg.add_argument("--listen", default="127.0.0.1:4222", help="client listen address (default 127.0.0.1:4222)")
    ncfg.add_argument("--store-dir", default="./nats-store", help="JetStream store directory")
    ncfg.set_defaults(func=cmd_nats_config)
    nk = nsub.add_parser("nkey", help="generate a participant's NATS user nkey: <id>.nk (seed, mode 600) and <id>.pub")
    nk.add_argument("--id", required=True)
    nk.add_argument("--out", required=True)
    nk.add_argument("--force", action="store_true")
    nk.set_defaults(func=cmd_nats_nkey)

    k = sub.add_parser("keys", help="identities")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    gen = ksub.add_parser("gen", help="generate an Ed25519 signing and an X25519 encryption key pair (the key "
                                      "file is created with mode 600)")
    gen.add_argument("--id", required=True)
    gen.add_argument("--role", required=True, choices=["coordinator", "aggregator", "worker", "operator"],
                     help="operator: may sign key events (fedbus keys revoke|rotate) and nothing else")
    gen.add_argument("--region", default="default")
    gen.add_argument("--out", required=True, help="directory for <id>.key")
    gen.add_argument("--force", action="store_true")
    gen.set_defaults(func=cmd_keys_gen)
    fed = ksub.add_parser("federation", help="write a federation file from a directory of key files")
    fed.add_argument("--keys", required=True)
    fed.add_argument("--out", required=True)
    fed.add_argument("--name", default="fedbus")
    fed.set_defaults(func=cmd_keys_federation)

    for name, what in (("revoke", "revoke a participant's key in a running job, at once and for good"),
                       ("rotate", "move a participant to a new signing key in a running job")):
        ev = ksub.add_parser(name, help=what + " (a signed key event on the job's control stream)")
        ev.add_argument("--federation", required=True)
        ev.add_argument("--key", required=True, help="the signer's (coordinator or operator) " + KEY_HELP)
        ev.add_argument("--job", required=True, help="job spec YAML, or a job id (with --prefix)")
        ev.add_argument("--prefix", default="fedbus", help="subject prefix when --job is a job id")
        ev.add_argument("--participant", required=True, help="the participant id whose key changes")
        add_connection_options(ev)
        ev.add_argument("--reason", default="", help="recorded in the event and the audit trail (at most 256 chars)")
        if name == "rotate":
            ev.add_argument("--new-key", required=True,
                            help="the participant's new key file (fedbus keys gen with the same id and role)")
        ev.set_defaults(func=cmd_keys_event)

    mo = sub.add_parser("models", help="the model registry: signed manifests, export, tags, rollback")
    mosub = mo.add_subparsers(dest="models_command", required=True)
    for name, what in (("list", "the job's kept versions, verified"),
                       ("show", "one version's verified manifest and tags, as JSON"),
                       ("export", "write a version's model as a PyTorch state_dict (and .safetensors), verified "
                                  "against its manifest"),
                       ("verify", "check a model file against a version's manifest"),
                       ("tag", "tag a version (tagged versions outlive retention), or --remove a tag"),
                       ("rollback", "continue the running job from an earlier version (a signed control event)")):
        m = mosub.add_parser(name, help=what)
        m.add_argument("--job", required=True, help="job spec YAML, or a job id (with --prefix)")
        m.add_argument("--prefix", default="fedbus", help="subject prefix when --job is a job id")
        m.add_argument("--federation", required=True, help="federation file: manifests are verified against it")
        add_connection_options(m)
        if name in ("show", "export", "verify", "rollback"):
            m.add_argument("--version", type=int, required=True)
        if name == "tag":
            m.add_argument("--version", type=int)
            m.add_argument("--tag", required=True)
            m.add_argument("--remove", action="store_true")
        if name == "export":
            m.add_argument("--out", required=True, help="the .pt file to write (a .safetensors one is written next to it)")
        if name == "verify":
            m.add_argument("--file", required=True, help="a .pt or .safetensors state_dict")
        if name in ("tag", "rollback"):
            m.add_argument("--key", required=True, help="the signer's (coordinator or operator) " + KEY_HELP)
        if name == "rollback":
            m.add_argument("--reason", default="", help="recorded in the event and the audit trail (at most 256 chars)")
            m.add_argument("--wait", type=float, default=60.0,
                           help="seconds to wait for the coordinator to commit the rolled-back version (0: don't)")
        m.set_defaults(func=cmd_models)

    st = sub.add_parser("status", help="a running job, live from the bus: round or version, cohort, who is "
                                       "training, stragglers, staleness, rejections, privacy, accuracy")
    st.add_argument("--job", required=True, help="job spec YAML (mode, planned rounds), or a job id (with --prefix)")
    st.add_argument("--prefix", default="fedbus", help="subject prefix when --job is a job id")
    st.add_argument("--federation", required=True, help="federation file: everything shown is verified against it")
    add_connection_options(st)
    st.add_argument("--id", help="the participant id this connection acts as on a secured server (an operator's): "
                                 "replies come to its own inbox")
    st.add_argument("--once", action="store_true",
                    help="print one plain snapshot and exit (the default when stdout is not a terminal)")
    st.add_argument("--listen", type=float, default=2.5, metavar="SECONDS",
                    help="snapshot: how long to listen first (heartbeats come every transport.heartbeat_s; default 2.5)")
    st.add_argument("--keep", action="store_true", help="live: keep showing the job after it is done (until Ctrl-C)")
    st.set_defaults(func=cmd_status)

    au = sub.add_parser("audit", help="the audit trail")
    ausub = au.add_subparsers(dest="audit_command", required=True)
    ver = ausub.add_parser("verify", help="check every signature and link of every writer's audit chain; exit 1 "
                                          "and name the first broken record if any")
    ver.add_argument("--job", required=True, help="job id, or the job spec file (for its id and subject prefix)")
    add_connection_options(ver)
    ver.add_argument("--prefix", default="fedbus", help="subject prefix, when --job is an id")
    ver.add_argument("--federation", help="federation file: the writers' public keys (without it signatures are "
                                          "not checked)")
    ver.set_defaults(func=cmd_audit_verify)

    rp = sub.add_parser("report", help="(re)build a coordinator run directory's report.html: charts, one round's "
                                       "trace, the job spec and the final model's manifest in one offline page")
    rp.add_argument("run_dir", metavar="RUN_DIR", help="the coordinator's --run-dir (holds summary.json)")
    rp.add_argument("--span-file", help="the run's JSONL span file (default RUN_DIR/spans.jsonl)")
    rp.set_defaults(func=cmd_report)

    s = sub.add_parser("schemas", help="write or check the JSON Schemas generated from the models")
    s.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "schemas"))
    s.add_argument("--check", action="store_true")
    s.set_defaults(func=cmd_schemas)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"fedbus: {exc}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
