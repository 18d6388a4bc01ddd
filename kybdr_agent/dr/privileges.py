"""Whether the agent's role may do what a failover needs, asked of the server (for the drills).

A test failover promises that a real one would work: the standby's role must be allowed to run
``pg_promote()`` and the old primary's to ``ALTER SYSTEM`` (how it is fenced). PostgreSQL 15 grants both to
superusers, ``pg_promote`` by ``GRANT EXECUTE`` and ``ALTER SYSTEM`` per parameter by
``GRANT ALTER SYSTEM ON PARAMETER default_transaction_read_only``.
"""

from __future__ import annotations

from typing import Final, Literal

import anyio

from kybdr_agent.errors import KybdrError
from kybdr_agent.postgres.connection import DATABASE_ERRORS, Connection, pg_message

_CHECKS: Final = {
    "pg_promote": (
        "SELECT r.rolsuper OR has_function_privilege('pg_catalog.pg_promote(boolean, integer)', 'EXECUTE') "
        "FROM pg_roles r WHERE r.rolname = current_user"
    ),
    "alter_system": (
        "SELECT r.rolsuper OR has_parameter_privilege('default_transaction_read_only', 'ALTER SYSTEM') "
        "FROM pg_roles r WHERE r.rolname = current_user"
    ),
}


async def privilege_check(
    conn: Connection,
    *,
    database: str,
    what: Literal["pg_promote", "alter_system"],
    timeout: float,  # noqa: ASYNC109 - applied inside with fail_after
) -> tuple[bool, str]:
    """(allowed, explanation); an unreachable server is "not known to be allowed", with the reason."""
    try:
        with anyio.fail_after(timeout):
            async with conn.connect(database) as session:
                allowed = bool(await session.fetchval(_CHECKS[what]))
                user = await session.fetchval("SELECT current_user")
    except TimeoutError:
        return False, f"{conn.describe()} did not answer within {timeout:g} s"
    except KybdrError as exc:
        return False, str(exc)
    except DATABASE_ERRORS as exc:
        return False, f"{conn.describe()}: {pg_message(exc)}"
    action = "run pg_promote()" if what == "pg_promote" else "ALTER SYSTEM (fence)"
    return allowed, f"role {user} may {action}" if allowed else f"role {user} may not {action}"
