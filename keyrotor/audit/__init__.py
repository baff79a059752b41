"""Who may do what, and the record of what they did: the audit log (events, actors, the chain),
its writers, its key and checkpoints, its verification, and the grants.

``keyrotor.audit`` keeps the names applications use (``actor_context``, ``AuditEvent``,
``write_event``); the rest lives in the modules of this package.
"""

from keyrotor.audit.log import AuditEvent, actor_context, write_event

__all__ = ["AuditEvent", "actor_context", "write_event"]
