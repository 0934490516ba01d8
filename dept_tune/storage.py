"""Where a study lives: a journal file in the output dir (the default), SQLite, or a database server (PostgreSQL).

- A journal file (`optuna.storages.JournalStorage`) is safe for several worker processes on one machine; it
  takes a file lock per write, so a killed worker never corrupts it.
- `sqlite:///file.db` is a database file for workers on one machine, like the journal. It is no way to share a
  study between machines: on a network file system SQLite's locks are unreliable (sqlite.org/faq.html#q5,
  and Optuna's own advice), so concurrent workers there may corrupt it.
- A server URL (`postgresql://user:password@host/db`, `mysql+pymysql://...`) shares one study between machines.

On every database, SQLite included, a running trial sends heartbeats; a trial without one for the grace period
(its worker died, on any machine or in any container) is failed and the study runs it again. (A journal file has
no heartbeats: a dead worker of this machine is found by its process id instead.)

A storage that cannot be opened or reached raises `StorageError` before anything trains; `find_study` reads
a study without creating anything, for a report.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from dept.extras import LazyModule

optuna = LazyModule("optuna", extra="tune")
sqlalchemy = LazyModule("sqlalchemy", extra="tune")  # comes with optuna

JOURNAL_NAME = "optuna_journal.log"
JOURNAL_SUFFIXES = (".log", ".journal")
RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")
STUDIES_TABLE = "studies"  # Optuna's table of studies in a database storage


class StorageError(RuntimeError):
    """The study's storage cannot be opened or reached."""


def default_storage(output_dir: str | Path) -> str:
    return str(Path(output_dir) / JOURNAL_NAME)


def open_storage(storage: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 on_stale_trial=None) -> optuna.storages.BaseStorage:
    """A journal file path, or an RDB URL; checked by connecting now (a missing file or table is created).

    Args:
        storage: a path ending in .log/.journal, or a SQLAlchemy URL.
        heartbeat_interval, grace_period: seconds; a database trial whose worker sent no heartbeat for
            `grace_period` is failed and handed to `on_stale_trial(study, trial)` (journal files have no
            heartbeats: a dead worker of this machine is found by its process id instead).
    """
    scheme = _scheme(storage)
    if scheme is None:
        path = Path(storage)
        if path.suffix not in JOURNAL_SUFFIXES:
            raise StorageError(f"--storage {storage!r} is neither a journal file (*.log, *.journal) nor a database "
                               f"URL ({', '.join(s + '://...' for s in RDB_SCHEMES)}).")
        if not path.parent.is_dir():
            raise StorageError(f"--storage {storage!r}: the directory {path.parent} does not exist; create it or "
                               "choose another path.")
        try:
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        except OSError as error:
            raise StorageError(f"Cannot open the journal file {storage}: {error}.") from error
    if scheme not in RDB_SCHEMES:
        raise StorageError(f"--storage {storage!r}: unknown database {scheme!r}; use one of "
                           f"{', '.join(s + '://...' for s in RDB_SCHEMES)}, or a journal file path.")
    heartbeat = {}
    if heartbeat_interval:
        heartbeat = dict(heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                         heartbeat_stale_trial_callback=on_stale_trial)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.9
            return optuna.storages.RDBStorage(storage, engine_kwargs=_engine_kwargs(scheme), **heartbeat)
    except Exception as error:  # sqlalchemy's OperationalError, a missing driver, a bad URL, ...
        raise _unreachable(storage, error) from error


def find_study(storage: str, study_name: str) -> optuna.Study:
    """Load an existing study to read it, creating nothing: no journal or database file, no table, no study.

    Raises:
        StorageError: the storage or the study does not exist (naming both), or the storage cannot be reached.
    """
    missing = StorageError(f"There is no study {study_name!r} in {_without_password(storage)}: nothing to report. "
                           "Check --storage, --study_name and --output_dir, or run without --report_only to "
                           "start the study.")
    scheme = _scheme(storage)
    if scheme is None and not Path(storage).is_file():  # opening a journal file creates it
        raise missing
    if scheme == "sqlite":  # connecting to a SQLite file creates it
        database = sqlalchemy.engine.make_url(storage).database
        if not database or not Path(database).is_file():
            raise missing
    if scheme is not None:  # opening an RDB storage creates Optuna's tables: look for them first
        engine = sqlalchemy.create_engine(storage, **_engine_kwargs(scheme))
        try:
            with engine.connect() as connection:
                if not sqlalchemy.inspect(connection).has_table(STUDIES_TABLE):
                    raise missing
        except sqlalchemy.exc.SQLAlchemyError as error:
            raise _unreachable(storage, error) from error
        finally:
            engine.dispose()
    opened = open_storage(storage)
    if study_name not in optuna.get_all_study_names(opened):
        raise missing
    return optuna.load_study(study_name=study_name, storage=opened)


def _scheme(storage: str) -> str | None:
    """The database of a URL (`postgresql+psycopg2://...` -> "postgresql"); None for a file path."""
    return storage.split("://", 1)[0].split("+", 1)[0] if "://" in storage else None


def _engine_kwargs(scheme: str) -> dict:
    return {"connect_args": {"connect_timeout": 10}} if scheme == "postgresql" else {}


def _unreachable(storage: str, error: Exception) -> StorageError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return StorageError(
        f"Cannot reach the study storage {_without_password(storage)}: {reason}. Check that the database "
        "server runs and accepts connections from this machine, and the user, password and database name "
        "(or use the default journal file in the output dir: drop --storage)."
    )


def _without_password(url: str) -> str:
    scheme, _, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
