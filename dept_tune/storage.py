"""Where a study lives: a journal file in the output dir (the default), SQLite, or an RDB URL (PostgreSQL).

- A journal file (`optuna.storages.JournalStorage`) is safe for several worker processes on one machine; it
  takes a file lock per write, so a killed worker never corrupts it.
- An RDB URL (`postgresql://user:password@host/db`, `mysql+pymysql://...`, `sqlite:///file.db`) is Optuna's
  way to share one study between machines. Heartbeats mark the trials of a worker that died elsewhere as
  failed, and the study retries them.

A storage that cannot be opened or reached raises `StorageError` before anything trains.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

JOURNAL_NAME = "optuna_journal.log"
JOURNAL_SUFFIXES = (".log", ".journal")
RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


class StorageError(RuntimeError):
    """The study's storage cannot be opened or reached."""


def default_storage(output_dir: str | Path) -> str:
    return str(Path(output_dir) / JOURNAL_NAME)


def open_storage(storage: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 on_stale_trial=None) -> optuna.storages.BaseStorage:
    """A journal file path, or an RDB URL; checked by connecting now.

    Args:
        storage: a path ending in .log/.journal, or a SQLAlchemy URL.
        heartbeat_interval, grace_period: seconds; an RDB trial whose worker sent no heartbeat for
            `grace_period` is failed and handed to `on_stale_trial(study, trial)` (journal files have no
            heartbeats: a dead worker of this machine is found by its process id instead).
    """
    scheme = storage.split("://", 1)[0].split("+", 1)[0] if "://" in storage else None
    if scheme is None:
        path = Path(storage)
        if path.suffix not in JOURNAL_SUFFIXES:
            raise StorageError(f"--storage {storage!r} is neither a journal file (*.log, *.journal) nor a database "
                               f"URL ({', '.join(s + '://...' for s in RDB_SCHEMES)}).")
        if not path.parent.is_dir():
            raise StorageError(f"--storage {storage!r}: the directory {path.parent} does not exist; create it or "
                               "choose another path.")
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as error:
            raise StorageError(f"Cannot open the journal file {storage}: {error}.") from error
    if scheme not in RDB_SCHEMES:
        raise StorageError(f"--storage {storage!r}: unknown database {scheme!r}; use one of "
                           f"{', '.join(s + '://...' for s in RDB_SCHEMES)}, or a journal file path.")
    engine_kwargs = {"connect_args": {"connect_timeout": 10}} if scheme == "postgresql" else {}
    heartbeat = {}
    if heartbeat_interval and scheme != "sqlite":
        heartbeat = dict(heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                         heartbeat_stale_trial_callback=on_stale_trial)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.9
            return RDBStorage(storage, engine_kwargs=engine_kwargs, **heartbeat)
    except Exception as error:  # sqlalchemy's OperationalError, a missing driver, a bad URL, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StorageError(
            f"Cannot reach the study storage {_without_password(storage)}: {reason}. Check that the database "
            "server runs and accepts connections from this machine, and the user, password and database name "
            "(or use the default journal file in the output dir: drop --storage)."
        ) from error


def _without_password(url: str) -> str:
    scheme, _, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
