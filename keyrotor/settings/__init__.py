"""Settings, read from the environment once.

``Settings.from_env()`` runs once per process (in the worker, the CLI, or an application's
start-up) and its values travel down as arguments. Applications that configure in code build
``Settings(...)`` directly with the same field names. The README's configuration reference
lists every variable.

The fields are grouped by concern, each part defined and documented in a module of its own:

- :class:`LibrarySettings` (``library``): what a KeyManager and a KeyrotorClient need in an
  application's process, made of :class:`KekSettings` (``kek``: the connections and the KEK),
  :class:`AuditSettings` (``audit``) and :class:`ReplicationSettings` (``replication``);
- :class:`WorkerSettings` (``worker``): the worker process's jobs, metrics server and logs;
- :class:`SchedulerSettings` (``scheduler``): the scheduler process;
- :class:`ApiSettings` (``api``): the HTTP API process, ``keyrotor serve``.

:class:`Settings` is all of them, so one object configures any process and every field keeps
its flat name (``settings.job_lease_s``). Code that needs one concern only takes that part
(:mod:`keyrotor.kek.factory` takes a :class:`KekSettings`).
"""

from __future__ import annotations

from keyrotor.settings.api import ApiSettings
from keyrotor.settings.audit import AuditSettings
from keyrotor.settings.base import SettingsPart
from keyrotor.settings.kek import ConnectionSettings, KekSettings
from keyrotor.settings.library import LibrarySettings
from keyrotor.settings.replication import ReplicationSettings
from keyrotor.settings.scheduler import SchedulerSettings
from keyrotor.settings.worker import WorkerSettings

__all__ = [
    "ApiSettings",
    "AuditSettings",
    "ConnectionSettings",
    "KekSettings",
    "LibrarySettings",
    "ReplicationSettings",
    "SchedulerSettings",
    "Settings",
    "SettingsPart",
    "WorkerSettings",
]


# pydantic lists inherited fields from the last base to the first: this order puts the
# connections and the KEK first, as in the README's configuration reference.
class Settings(ApiSettings, SchedulerSettings, WorkerSettings, LibrarySettings):
    """All of keyrotor's configuration. Frozen: build a new one to change anything."""
