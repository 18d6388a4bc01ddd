"""Is a restore's target database empty? Only if it is exactly what ``CREATE DATABASE`` made, untouched.

Counting tables and functions is not enough: a database holding only a schema, an enum, a domain, a
text-search configuration, an ``ALTER DATABASE … SET``, an owner or a comment is somebody's work, and a
restore without ``--force`` must never replace it. So the check is generic rather than a list of kinds:

- every object created after initdb has an OID of at least 16384 (``FirstNormalObjectId``); the check
  counts such rows in *every* per-database catalog that has OIDs, whatever PostgreSQL version adds;
- privileges and comments on built-in objects (``GRANT … ON SCHEMA public``, ``COMMENT ON SCHEMA public``)
  are compared with ``template1``'s;
- database-level state lives in shared catalogs: its owner (a database owned by a role other than the
  agent's or the bootstrap superuser was made for someone), its comment, its settings, its privileges and
  its connection limit.

``describe`` is pure: it turns what was found into the reasons an operator reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

FIRST_NORMAL_OID: Final = 16384
BOOTSTRAP_SUPERUSER_OID: Final = 10

_CATALOGS_WITH_OIDS: Final = """
select c.relname from pg_catalog.pg_class c
join pg_catalog.pg_attribute a on a.attrelid = c.oid and a.attname = 'oid' and not a.attisdropped
where c.relnamespace = 'pg_catalog'::regnamespace and c.relkind = 'r' and not c.relisshared
order by 1
"""

# Privileges and comments on objects initdb made (OIDs below 16384): identical in a fresh database and in
# template1.
_BUILTIN_FINGERPRINT: Final = """
select md5(coalesce(string_agg(x, ',' order by x), '')) from (
  select 'n' || oid || ':' || nspowner || ':' || coalesce(nspacl::text, '') as x
    from pg_catalog.pg_namespace where oid < 16384
  union all select 'c' || oid || ':' || relacl::text from pg_catalog.pg_class
    where oid < 16384 and relacl is not null
  union all select 'p' || oid || ':' || proacl::text from pg_catalog.pg_proc
    where oid < 16384 and proacl is not null
  union all select 't' || oid || ':' || typacl::text from pg_catalog.pg_type
    where oid < 16384 and typacl is not null
  union all select 'l' || oid || ':' || coalesce(lanacl::text, '') from pg_catalog.pg_language
    where oid < 16384
  union all select 'd' || objoid || ':' || classoid || ':' || objsubid || ':' || md5(description)
    from pg_catalog.pg_description where objoid < 16384
) builtin
"""

_DATABASE_STATE: Final = """
select d.oid, d.datdba, pg_catalog.pg_get_userbyid(d.datdba) as owner, d.datacl is not null as has_acl,
       d.datconnlimit,
       (select r.oid from pg_catalog.pg_roles r where r.rolname = current_user) as agent_role,
       exists (select 1 from pg_catalog.pg_shdescription s
               where s.objoid = d.oid and s.classoid = 'pg_catalog.pg_database'::regclass) as has_comment,
       (select count(*) from pg_catalog.pg_db_role_setting s where s.setdatabase = d.oid) as settings
from pg_catalog.pg_database d where d.datname = $1
"""

_CATALOG_WORDS: Final = {
    "pg_namespace": "schema(s)",
    "pg_class": "relation(s)",
    "pg_type": "type(s)",
    "pg_proc": "function(s)",
    "pg_largeobject_metadata": "large object(s)",
    "pg_extension": "extension(s)",
    "pg_ts_config": "text-search configuration(s)",
    "pg_ts_dict": "text-search dictionar(ies)",
    "pg_collation": "collation(s)",
    "pg_default_acl": "default privilege(s)",
    "pg_event_trigger": "event trigger(s)",
    "pg_publication": "publication(s)",
    "pg_foreign_server": "foreign server(s)",
    "pg_constraint": "constraint(s)",
}


@dataclass(frozen=True)
class TargetContents:
    """What an existing database holds beyond a fresh ``CREATE DATABASE``."""

    user_objects: dict[str, int] = field(default_factory=dict)
    builtin_changed: bool = False
    foreign_owner: str | None = None
    has_comment: bool = False
    settings: int = 0
    has_acl: bool = False
    connection_limit: int | None = None

    @property
    def empty(self) -> bool:
        return not describe(self)


def describe(found: TargetContents) -> list[str]:
    """PURE. One phrase per kind of content, in a stable order; empty means "fresh and untouched"."""
    reasons = [
        f"{count} {_CATALOG_WORDS.get(catalog, catalog + ' row(s)')}"
        for catalog, count in sorted(found.user_objects.items())
        if count
    ]
    if found.builtin_changed:
        reasons.append("changed privileges or comments on built-in objects (such as schema public)")
    if found.foreign_owner is not None:
        reasons.append(f"owner {found.foreign_owner}")
    if found.has_comment:
        reasons.append("a comment")
    if found.settings:
        reasons.append(f"{found.settings} ALTER DATABASE/ROLE … SET setting(s)")
    if found.has_acl:
        reasons.append("granted privileges")
    if found.connection_limit is not None:
        reasons.append(f"a connection limit of {found.connection_limit}")
    return reasons


async def inspect_target(admin: Any, target_conn: Any, template_conn: Any, target: str) -> TargetContents:
    """Read what ``target`` holds: ``admin`` on the maintenance database, the others on target/template1."""
    state = await admin.fetchrow(_DATABASE_STATE, target)
    if state is None:
        return TargetContents()
    catalogs = [row["relname"] for row in await target_conn.fetch(_CATALOGS_WITH_OIDS)]
    counts: dict[str, int] = {}
    for catalog in catalogs:
        query = f"select count(*) from pg_catalog.{catalog} where oid >= {FIRST_NORMAL_OID}"  # noqa: S608 - catalog names come from pg_class
        counts[catalog] = int(await target_conn.fetchval(query))
    # Large objects may carry any OID a client chose; any one of them is content.
    counts["pg_largeobject_metadata"] = int(
        await target_conn.fetchval("select count(*) from pg_catalog.pg_largeobject_metadata")
    )
    builtin_here = await target_conn.fetchval(_BUILTIN_FINGERPRINT)
    builtin_template = await template_conn.fetchval(_BUILTIN_FINGERPRINT)
    owner_oid = int(state["datdba"])
    return TargetContents(
        user_objects={k: v for k, v in counts.items() if v},
        builtin_changed=builtin_here != builtin_template,
        foreign_owner=None if owner_oid in (BOOTSTRAP_SUPERUSER_OID, state["agent_role"]) else str(state["owner"]),
        has_comment=bool(state["has_comment"]),
        settings=int(state["settings"]),
        has_acl=bool(state["has_acl"]),
        connection_limit=None if int(state["datconnlimit"]) == -1 else int(state["datconnlimit"]),
    )
