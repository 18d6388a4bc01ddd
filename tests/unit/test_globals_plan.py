"""Reading pg_dumpall's globals and planning what a restore creates (kybdr_agent/backup/globals_plan.py), and the
roles a schema script names: existing roles are never touched, nothing is dropped, every name is quoted."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.backup.globals_plan import (
    GlobalsParser,
    Membership,
    SchemaNeeds,
    TargetState,
    plan_globals,
)
from kybdr_agent.backup.globals_sql import SqlSyntaxError, Statement, StatementReader, quote_ident

# What pg_dumpall 15.18 --globals-only writes (abridged from a real run, long lines shortened: roles, a
# comment, settings, memberships, a parameter privilege, a tablespace with options, a grant and a comment).
DUMPALL = r"""--
-- PostgreSQL database cluster dump
--

\restrict c0C6i7QqYEPQltt

SET default_transaction_read_only = off;

SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;

CREATE ROLE "Mixed.Case";
ALTER ROLE "Mixed.Case" WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN NOREPLICATION NOBYPASSRLS;
CREATE ROLE agent;
ALTER ROLE agent WITH NOSUPERUSER INHERIT CREATEROLE CREATEDB LOGIN NOREPLICATION NOBYPASSRLS;
CREATE ROLE app_owner;
ALTER ROLE app_owner WITH NOSUPERUSER LOGIN CONNECTION LIMIT 5 {PW} VALID UNTIL '2030-01-01 00:00:00+00';
CREATE ROLE postgres;
ALTER ROLE postgres WITH SUPERUSER INHERIT CREATEROLE CREATEDB LOGIN REPLICATION BYPASSRLS {PW};
CREATE ROLE readers;
ALTER ROLE readers WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB NOLOGIN NOREPLICATION NOBYPASSRLS;
COMMENT ON ROLE readers IS 'read-only group; it''s fine';
CREATE ROLE "we""ird role";
ALTER ROLE "we""ird role" WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN CONNECTION LIMIT -1;

--
-- User Configurations
--

ALTER ROLE "Mixed.Case" SET search_path TO '"$user"', 'public';
ALTER ROLE app_owner SET search_path TO 'app', 'public';
ALTER ROLE readers SET "app.custom" TO 'a;b''c';
ALTER ROLE agent SET work_mem TO '64MB';

GRANT readers TO app_owner GRANTED BY postgres;
GRANT readers TO "we""ird role" WITH ADMIN OPTION GRANTED BY postgres;
GRANT app_owner TO agent GRANTED BY postgres;

GRANT SET ON PARAMETER work_mem TO app_owner;

CREATE TABLESPACE ts1 OWNER app_owner LOCATION '/srv/ts1';
ALTER TABLESPACE ts1 SET (random_page_cost=1.1);
GRANT ALL ON TABLESPACE ts1 TO readers;
COMMENT ON TABLESPACE ts1 IS 'fast disk';
CREATE TABLESPACE old OWNER postgres LOCATION '/srv/old';

\unrestrict c0C6i7QqYEPQltt
""".replace("{PW}", "PASSWORD 'SCRAM-SHA-256$4096:Ogg==$xRz=:baO='")

EMPTY_SERVER = TargetState(
    roles=frozenset({"postgres", "agent"}), tablespaces=frozenset({"pg_default"}), current_user="agent"
)


def _parse(text: str) -> GlobalsParser:
    parser = GlobalsParser()
    reader = StatementReader()
    for stmt in [*reader.feed(text), *reader.finish()]:
        parser.add(stmt)
    return parser


def test_parses_what_pg_dumpall_writes() -> None:
    g = _parse(DUMPALL).globals
    assert list(g.roles) == ["Mixed.Case", "agent", "app_owner", "postgres", "readers", 'we"ird role']
    owner = g.roles["app_owner"]
    assert "CONNECTION LIMIT 5" in owner.options
    assert "VALID UNTIL '2030-01-01 00:00:00+00'" in owner.options
    assert owner.has_password
    assert not g.roles["readers"].has_password
    assert g.roles['we"ird role'].options[-1] == "CONNECTION LIMIT -1"
    assert g.roles["readers"].comment == "read-only group; it's fine"
    assert g.roles["readers"].settings == ["SET \"app.custom\" TO 'a;b''c'"]
    assert g.roles["Mixed.Case"].settings == ["SET \"search_path\" TO '\"$user\"', 'public'"]
    assert g.memberships[:2] == [
        Membership("readers", "app_owner"),
        Membership("readers", 'we"ird role', ("ADMIN OPTION",)),
    ]
    assert [p.sql() for p in g.parameter_privileges] == ['GRANT SET ON PARAMETER "work_mem" TO "app_owner"']
    ts = g.tablespaces["ts1"]
    assert (ts.owner, ts.location, ts.options, ts.comment) == (
        "app_owner",
        "/srv/ts1",
        '("random_page_cost" = 1.1)',
        "fast disk",
    )
    assert [p.sql() for p in ts.privileges] == ['GRANT ALL ON TABLESPACE "ts1" TO "readers"']
    assert g.skipped == []


def test_plan_creates_only_what_is_missing_and_never_touches_existing_roles() -> None:
    target = TargetState(
        roles=frozenset({"postgres", "agent", "readers"}),
        tablespaces=frozenset({"pg_default", "old"}),
        current_user="agent",
    )
    plan = plan_globals(_parse(DUMPALL).globals, target)
    assert plan.roles_created == ["Mixed.Case", "app_owner", 'we"ird role']
    assert plan.roles_existing == ["agent", "postgres", "readers"]
    assert [t.name for t in plan.tablespaces_created] == ["ts1"]
    assert plan.tablespaces_existing == ["old"]
    sql = plan.statements
    assert not any("DROP" in s.upper() for s in sql)
    for existing in ("agent", "postgres", "readers"):
        q = quote_ident(existing)
        assert not any(s.startswith((f"CREATE ROLE {q}", f"ALTER ROLE {q}", f"COMMENT ON ROLE {q}")) for s in sql)
        assert not any(s.endswith(f"TO {q}") and s.startswith(f"GRANT {quote_ident('app_owner')}") for s in sql)
    # New roles join existing groups; an existing role's memberships (agent in app_owner) stay as they are.
    assert plan.memberships_granted == ["app_owner in readers", 'we"ird role in readers']
    assert 'GRANT "readers" TO "we""ird role" WITH ADMIN OPTION' in sql
    assert 'GRANT "app_owner" TO "agent"' not in sql
    assert plan.settings_applied == 2  # Mixed.Case and app_owner; not readers' nor agent's (they exist)
    create_owner = next(i for i, s in enumerate(sql) if s.startswith('CREATE ROLE "app_owner"'))
    assert sql.index('ALTER TABLESPACE "ts1" OWNER TO "app_owner"') > create_owner
    assert sql[-3:] == [
        'ALTER TABLESPACE "ts1" SET ("random_page_cost" = 1.1)',
        'GRANT ALL ON TABLESPACE "ts1" TO "readers"',
        "COMMENT ON TABLESPACE \"ts1\" IS 'fast disk'",
    ]


def test_postgres_and_the_agent_are_never_created() -> None:
    target = TargetState(roles=frozenset({"rdsadmin"}), tablespaces=frozenset(), current_user="rdsadmin")
    plan = plan_globals(_parse(DUMPALL).globals, target)
    assert "postgres" in plan.roles_not_created
    assert not any(s.startswith('CREATE ROLE "postgres"') for s in plan.statements)
    assert 'ALTER TABLESPACE "old" OWNER TO "postgres"' not in plan.statements


def test_every_planned_statement_is_one_statement_whatever_the_names() -> None:
    plan = plan_globals(_parse(DUMPALL).globals, EMPTY_SERVER)
    for sql in plan.statements:
        assert len(_read_all(sql)) == 1, sql


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), min_size=1, max_size=30))
def test_hostile_names_stay_names(name: str) -> None:
    q = quote_ident(name)
    text = (
        f"CREATE ROLE {q};\nALTER ROLE {q} WITH NOLOGIN;\nALTER ROLE {q} SET search_path TO 'x';\n"
        f"GRANT {q} TO {q};\nCOMMENT ON ROLE {q} IS 'c';\n"
    )
    plan = plan_globals(_parse(text).globals, EMPTY_SERVER)
    if name in ("postgres", "agent") or name.startswith("pg_"):
        assert plan.statements == []
        return
    assert plan.roles_created == [name]
    for sql in plan.statements:
        [stmt] = _read_all(sql)
        assert any(t.kind == "ident" and t.value == name for t in stmt)


def _read_all(sql: str) -> list[Statement]:
    reader = StatementReader()
    return [*reader.feed(sql), *reader.finish()]


def test_what_it_does_not_know_is_skipped_or_refused() -> None:
    g = _parse(
        "SECURITY LABEL FOR selinux ON ROLE a IS 'x';\nALTER ROLE a IN DATABASE d SET work_mem TO '1MB';\n"
        "CREATE ROLE a;\n"
    ).globals
    assert g.skipped == ["SECURITY LABEL FOR …", "a setting of role a for one database (ALTER ROLE … IN DATABASE)"]
    with pytest.raises(SqlSyntaxError, match="not a role attribute"):
        _parse("CREATE ROLE b;\nALTER ROLE b WITH LOGIN SOMENEWTHING;\n")
    with pytest.raises(SqlSyntaxError) as caught:
        _parse("CREATE ROLE b;\nALTER ROLE b WITH LOGIN 'secret-looking';\n")
    assert "secret-looking" not in str(caught.value)


def test_membership_of_a_group_the_server_lacks_is_reported() -> None:
    g = _parse("CREATE ROLE m;\nGRANT ghost TO m;\n").globals
    plan = plan_globals(g, EMPTY_SERVER)
    assert plan.statements == ['CREATE ROLE "m"']
    assert plan.skipped == ["membership of m in ghost: ghost is not on the server"]


# --- roles a schema names ----------------------------------------------------------------------------

SCHEMA = r"""
\restrict k
SET client_encoding = 'UTF8';
CREATE SCHEMA app;
ALTER SCHEMA app OWNER TO app_owner;
CREATE FUNCTION app.f() RETURNS integer LANGUAGE sql AS $$ select 1 /* OWNER TO nobody */ $$;
ALTER FUNCTION app.f() OWNER TO app_owner;
SET default_tablespace = '';
CREATE TABLE public.owner (x integer);
SET default_tablespace = "fast disk";
CREATE INDEX i ON public.owner (x);
SET default_tablespace = slow;
ALTER TABLE public.owner OWNER TO postgres;
CREATE POLICY p1 ON app.accounts TO app_reader, "Mixed.Case" USING (true) WITH CHECK (x = 'TO fake');
CREATE USER MAPPING FOR mapped SERVER s OPTIONS (user 'remote');
GRANT SELECT ON TABLE app.accounts TO readers;
GRANT SELECT(a), UPDATE(b) ON TABLE public.owner TO "we""ird role" WITH GRANT OPTION;
GRANT ALL ON SCHEMA public TO PUBLIC;
REVOKE ALL ON FUNCTION app.f() FROM PUBLIC;
REVOKE ALL ON TABLE app.accounts FROM revoked CASCADE;
SET SESSION AUTHORIZATION 'grantor';
GRANT USAGE ON SCHEMA app TO "to";
RESET SESSION AUTHORIZATION;
ALTER DEFAULT PRIVILEGES FOR ROLE app_owner IN SCHEMA app GRANT SELECT ON TABLES  TO readers2;
ALTER DEFAULT PRIVILEGES FOR ROLE app_owner REVOKE ALL ON FUNCTIONS FROM PUBLIC;
COMMENT ON TABLE app.accounts IS 'GRANT x TO fake';
\unrestrict k
"""


def test_every_role_a_schema_names() -> None:
    refs = SchemaNeeds()
    reader = StatementReader()
    for stmt in [*reader.feed(SCHEMA), *reader.finish()]:
        refs.add(stmt)
    assert refs.roles == {
        "app_owner",
        "postgres",
        "app_reader",
        "Mixed.Case",
        "mapped",
        "readers",
        'we"ird role',
        "revoked",
        "grantor",
        "to",
        "readers2",
    }
    assert refs.tablespaces == {"fast disk", "slow"}


def test_names_in_a_latin1_database_are_decoded() -> None:
    script = "SET client_encoding = 'LATIN1';\nALTER TABLE t OWNER TO \"caf\xe9\";\n"
    refs = SchemaNeeds()
    reader = StatementReader()
    for stmt in [*reader.feed(script), *reader.finish()]:
        refs.add(stmt)
    assert refs.roles == {"caf\u00e9"}
