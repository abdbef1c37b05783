"""The off-site commands of `backhaul-collector`: check, `offsite status|sync`, `recover`."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from collector.offsite import state
from collector.offsite.config import OffsiteTarget
from common.errors import BackhaulError, ConfigError, ExitCode
from common.logsetup import setup_logging

if TYPE_CHECKING:
    from collector.config import CollectorConfig

# boto3 (about 10 MiB and a tenth of a second) loads only where a command reaches a
# bucket: a collector without [[offsite]] targets never imports it.
log = logging.getLogger(__name__)
Operation = Callable[["CollectorConfig", argparse.Namespace], int]


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `offsite status`, `offsite sync` and `recover` to the collector's parser."""
    offsite = sub.add_parser("offsite", help="off-site copies: status, sync")
    inner = offsite.add_subparsers(dest="offsite_command", required=True)
    status = inner.add_parser("status", help="per target: copied, pending, last error")
    status.add_argument("--config", type=Path, required=True, help="path to collector.toml")
    status.set_defaults(operation=status_command)
    syncing = inner.add_parser("sync", help="copy everything still missing, then exit")
    syncing.add_argument("--config", type=Path, required=True, help="path to collector.toml")
    syncing.add_argument("--target", help="only this target")
    syncing.add_argument("-v", "--verbose", action="store_true", help="log to stderr too")
    syncing.set_defaults(operation=sync_command)
    recover = sub.add_parser("recover", help="rebuild the local store from an off-site target")
    recover.add_argument("--config", type=Path, required=True, help="path to collector.toml")
    recover.add_argument("--from", dest="source", required=True, help="the [[offsite]] name")
    recover.add_argument("--identity", type=Path, required=True,
                         help="age identity file (the private key, kept off the VM)")
    recover.add_argument("--agent", help="only this agent")
    recover.add_argument("--database", help="only this database")
    recover.add_argument("-v", "--verbose", action="store_true", help="log to stderr too")
    recover.set_defaults(operation=recover_command)


def target_named(config: CollectorConfig, name: str) -> OffsiteTarget:
    """Raises ConfigError when no `[[offsite]]` table has that name."""
    for target in config.offsite:
        if target.name == name:
            return target
    known = ", ".join(t.name for t in config.offsite) or "none configured"
    raise ConfigError(f"no [[offsite]] target named {name!r} in {config.source} ({known})")


def check_targets(config: CollectorConfig) -> list[str]:
    """Reach every target's bucket (and its Object Lock); one line each for check-config.

    Raises:
        ConfigError: a lock is configured on a bucket without Object Lock.
        StorageError: a bucket cannot be reached or used.
    """
    if not config.offsite:
        return []
    from collector.offsite.bucket import Bucket

    lines = []
    for target in config.offsite:
        Bucket(target).check()
        lock = f"{target.lock_mode} {target.lock_days} d" if target.lock_mode else "no lock"
        lines.append(f"offsite {target.name}: {target.endpoint} bucket {target.bucket} "
                     f"({lock}): reachable")
    return lines


def check_locks(config: CollectorConfig) -> None:
    """At `serve` start: refuse a lock on a bucket without Object Lock.

    A target that cannot be reached now is only logged: the copier retries it, and
    backups keep being stored meanwhile.

    Raises:
        ConfigError: a lock is configured on a bucket without Object Lock, or a secret
            or recipients file is unusable.
    """
    if not config.offsite:
        return
    from collector.offsite.bucket import Bucket, OffsiteError

    for target in config.offsite:
        try:
            Bucket(target).check()
        except OffsiteError as exc:
            log.warning("offsite %s: not reachable at start (%s); will retry", target.name, exc)


def prune_targets(config: CollectorConfig, dry_run: bool) -> bool:
    """After the local prune: cloud copies on targets with `prune = true`; False on failure."""
    pruned = [t for t in config.offsite if t.prune]
    if not pruned:
        return True
    from collector.offsite.prune import prune_target

    ok = True
    for target in pruned:
        try:
            run = prune_target(target, config.storage.root, dry_run)
        except BackhaulError as exc:
            print(f"offsite {target.name}: prune FAILED: {exc}")
            ok = False
            continue
        verb = "would delete" if dry_run else "deleted"
        for ref in run.deleted:
            print(f"offsite {target.name}: {verb} {ref}")
        for ref, until in run.locked:
            print(f"offsite {target.name}: kept {ref}: locked until {until.isoformat()}")
        for ref, why in run.failed:
            print(f"offsite {target.name}: FAILED {ref}: {why}")
        ok = ok and not run.failed
    return ok


def status_command(config: CollectorConfig, args: argparse.Namespace) -> int:
    from collector.offsite.copy import pending

    if not config.offsite:
        print("no [[offsite]] target configured")
        return ExitCode.OK
    root = config.storage.root
    for target in config.offsite:
        recorded = state.load(root, target.name)
        waiting = pending(root, target.name)
        print(f"{target.name}: {len(recorded.copied)} copied, {len(waiting)} pending")
        if waiting:
            oldest = waiting[0].backup.manifest.get("stored_at", "?")
            print(f"  oldest pending: {waiting[0].ref} (stored {oldest})")
        if recorded.last_success_at:
            print(f"  last copy: {recorded.last_success_at}")
        if recorded.last_error:
            print(f"  last error ({recorded.last_error_at}, {recorded.failures_in_a_row} in a "
                  f"row): {recorded.last_error}")
    return ExitCode.OK


def _log_to_folder(config: CollectorConfig, verbose: bool) -> None:
    """Copies and recoveries are logged like serve's: to the log folder and syslog."""
    setup_logging("backhaul-collector", config.log.dir, use_syslog=config.log.syslog,
                  level=getattr(logging, config.log.level.upper()),
                  stderr_level=logging.INFO if verbose else None)


def sync_command(config: CollectorConfig, args: argparse.Namespace) -> int:
    from collector.offsite.copier import sync_target

    _log_to_folder(config, args.verbose)
    targets = [target_named(config, args.target)] if args.target else list(config.offsite)
    if not targets:
        raise ConfigError(f"no [[offsite]] target in {config.source}")
    failed = 0
    for target in targets:
        started = datetime.now(UTC)
        try:
            copied = sync_target(target, config.storage.root)
        except BackhaulError as exc:
            print(f"{target.name}: FAILED: {exc}")
            failed += 1
            continue
        seconds = (datetime.now(UTC) - started).total_seconds()
        print(f"{target.name}: {copied} backup(s) copied in {seconds:.1f} s, nothing pending")
    return ExitCode.STORAGE if failed else ExitCode.OK


def recover_command(config: CollectorConfig, args: argparse.Namespace) -> int:
    from collector.offsite.recover import recover

    target = target_named(config, args.source)
    _log_to_folder(config, args.verbose)
    run = recover(target, config, args.identity, args.agent, args.database,
                  progress=print)
    print(f"{len(run.stored)} recovered, {len(run.skipped)} skipped, "
          f"{len(run.failed)} failed")
    return ExitCode.INTEGRITY if run.failed else ExitCode.OK
