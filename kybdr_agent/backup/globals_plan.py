"""PURE. What a backup's globals hold, what a restore creates from them, and which roles a database needs.

``GlobalsParser`` reads ``pg_dumpall --globals-only`` statement by statement into roles (attributes,
comment, settings), memberships, parameter privileges and tablespaces; nothing it does not understand is
applied — a statement it does not know is reported as skipped, and a role attribute it does not know is an
error (creating a role with half its attributes would be worse than not creating it). ``plan_globals``
decides, against what the target server already has, the statements a restore runs: only ``CREATE``,
``GRANT``, ``COMMENT`` and ``ALTER … SET`` on roles and tablespaces *it creates* — never a ``DROP``, never a
change to a role that exists (its attributes, password, settings and memberships stay as they are), and
never anything about ``postgres`` or the agent's own role. Every name and literal in those statements is
quoted here, not copied from the dump.

``SchemaNeeds`` reads a database's schema script (``pg_restore --schema-only``) for the roles and tablespaces
it names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from kybdr_agent.backup.globals_sql import (
    SqlSyntaxError,
    Statement,
    Token,
    client_encoding,
    decode_name,
    quote_ident,
    quote_literal,
)

PROTECTED_ROLES: Final = frozenset({"postgres"})
_ROLE_FLAGS: Final = frozenset(
    f"{no}{flag}"
    for flag in ("SUPERUSER", "INHERIT", "CREATEROLE", "CREATEDB", "LOGIN", "REPLICATION", "BYPASSRLS")
    for no in ("", "NO")
)


@dataclass
class Role:
    name: str
    options: list[str] = field(default_factory=list)  # rendered: "LOGIN", "CONNECTION LIMIT 5", "PASSWORD '…'"
    comment: str | None = None
    settings: list[str] = field(default_factory=list)  # rendered: "SET \"search_path\" TO 'app', 'public'"

    @property
    def has_password(self) -> bool:
        return any(option.startswith("PASSWORD '") or option.startswith("PASSWORD E'") for option in self.options)


@dataclass(frozen=True)
class Membership:
    group: str
    member: str
    options: tuple[str, ...] = ()  # rendered: "ADMIN OPTION", "INHERIT FALSE"


@dataclass(frozen=True)
class Privilege:
    """One GRANT or REVOKE of privileges on a parameter or a tablespace, to or from one grantee."""

    verb: str  # GRANT | REVOKE
    privileges: str  # rendered: "SET, ALTER SYSTEM"
    target: str  # rendered: "PARAMETER \"work_mem\"" / "TABLESPACE \"ts\""
    grantee: str | None  # None: PUBLIC
    grant_option: bool = False

    def sql(self) -> str:
        who = "PUBLIC" if self.grantee is None else quote_ident(self.grantee)
        if self.verb == "GRANT":
            return f"GRANT {self.privileges} ON {self.target} TO {who}" + (
                " WITH GRANT OPTION" if self.grant_option else ""
            )
        return f"REVOKE {self.privileges} ON {self.target} FROM {who}"


@dataclass
class Tablespace:
    name: str
    location: str
    owner: str | None = None
    options: str | None = None  # rendered "(random_page_cost = '1.1')"
    comment: str | None = None
    privileges: list[Privilege] = field(default_factory=list)


@dataclass
class Globals:
    roles: dict[str, Role] = field(default_factory=dict)
    memberships: list[Membership] = field(default_factory=list)
    parameter_privileges: list[Privilege] = field(default_factory=list)
    tablespaces: dict[str, Tablespace] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _names(tokens: Iterable[Token]) -> list[str]:
    return [t.name for t in tokens if t.name is not None]


def _split(stmt: Statement, start: int, stop: int) -> list[Statement]:
    """The comma-separated items of ``stmt[start:stop]``."""
    items: list[list[Token]] = [[]]
    for t in stmt[start:stop]:
        if t.kind == "op" and t.value == ",":
            items.append([])
        else:
            items[-1].append(t)
    return [tuple(item) for item in items if item]


def _find(stmt: Statement, start: int, *words: str) -> int:
    return next((i for i in range(start, len(stmt)) if stmt[i].kw(*words)), len(stmt))


def _value(tokens: Statement) -> str:
    """A setting's or option's value, re-quoted: strings and words as literals, numbers as they are."""
    sign = "-" if tokens and tokens[0].kind == "op" and tokens[0].value == "-" else ""
    rest = tokens[1:] if sign else tokens
    if len(rest) != 1 or rest[0].kind not in ("string", "word", "ident", "number"):
        raise SqlSyntaxError("a setting or option value is not a single literal")
    return sign + rest[0].value if rest[0].kind == "number" else quote_literal(rest[0].value)


def _dotted(tokens: Statement) -> str:
    """A (possibly dotted) parameter or option name, quoted part by part."""
    parts = [t for t in tokens if not (t.kind == "op" and t.value == ".")]
    if not parts or any(t.name is None for t in parts):
        raise SqlSyntaxError("a parameter name is not an identifier")
    return ".".join(quote_ident(t.name or "") for t in parts)


class GlobalsParser:
    """``pg_dumpall --globals-only``, statement by statement (fed in order), into ``Globals``. The text is
    read as decoded text (the agent runs pg_dumpall with ``--encoding=UTF8`` and decodes its output)."""

    def __init__(self) -> None:
        self.globals = Globals()

    @staticmethod
    def _n(t: Token) -> str:
        if t.name is None:
            raise SqlSyntaxError(f"expected a name, found {t.kind}")
        return t.name

    @staticmethod
    def _s(t: Token) -> str:
        if t.kind != "string":
            raise SqlSyntaxError(f"expected a string, found {t.kind}")
        return t.value

    def _role(self, t: Token) -> Role:
        name = self._n(t)
        return self.globals.roles.setdefault(name, Role(name))

    def add(self, stmt: Statement) -> None:
        if not stmt or stmt[0].kind == "meta":
            return
        w = [t.value.upper() if t.kind == "word" else "" for t in stmt[:4]] + [""] * 4
        g = self.globals
        if w[0] == "SET":
            return  # session settings of the dump's own connection
        if w[:2] == ["CREATE", "ROLE"] and len(stmt) >= 3:
            role = self._role(stmt[2])
            role.options += self._role_options(stmt, 4 if len(stmt) > 3 and stmt[3].kw("WITH") else 3, role.name)
        elif w[:2] == ["ALTER", "ROLE"] and len(stmt) >= 4 and w[3] in ("WITH", "SET", "IN"):
            role = self._role(stmt[2])
            if w[3] == "WITH":
                role.options += self._role_options(stmt, 4, role.name)
            elif w[3] == "IN":
                g.skipped.append(f"a setting of role {role.name} for one database (ALTER ROLE … IN DATABASE)")
            else:
                to = _find(stmt, 4, "TO") if not any(t.value == "=" for t in stmt) else _find_op(stmt, "=")
                values = ", ".join(_value(v) for v in _split(stmt, to + 1, len(stmt)))
                role.settings.append(f"SET {_dotted(stmt[4:to])} TO {values}")
        elif w[:3] == ["COMMENT", "ON", "ROLE"] and len(stmt) == 6 and stmt[4].kw("IS"):
            self._role(stmt[3]).comment = None if stmt[5].kw("NULL") else self._s(stmt[5])
        elif w[:2] == ["CREATE", "TABLESPACE"]:
            at = _find(stmt, 3, "LOCATION")
            space = Tablespace(self._n(stmt[2]), self._s(stmt[at + 1]) if at + 1 < len(stmt) else "")
            owner = _find(stmt, 3, "OWNER")
            space.owner = self._n(stmt[owner + 1]) if owner + 1 < at else None
            g.tablespaces[space.name] = space
        elif w[:2] == ["ALTER", "TABLESPACE"] and len(stmt) > 4 and self._n(stmt[2]) in g.tablespaces:
            space = g.tablespaces[self._n(stmt[2])]
            if stmt[3].kw("OWNER") and stmt[4].kw("TO"):
                space.owner = self._n(stmt[5])
            elif stmt[3].kw("SET") and stmt[4].value == "(" and stmt[-1].value == ")":
                items = [(item[0], item[2:]) for item in _split(stmt, 5, len(stmt) - 1) if len(item) >= 3]
                space.options = "(" + ", ".join(f"{_dotted((k,))} = {_value(v)}" for k, v in items) + ")"
            else:
                g.skipped.append(f"ALTER TABLESPACE {space.name} {stmt[3].value.upper()} …")
        elif w[:3] == ["COMMENT", "ON", "TABLESPACE"] and len(stmt) == 6 and self._n(stmt[3]) in g.tablespaces:
            g.tablespaces[self._n(stmt[3])].comment = None if stmt[5].kw("NULL") else self._s(stmt[5])
        elif w[0] in ("GRANT", "REVOKE"):
            self._grant(stmt, w[0])
        else:
            g.skipped.append(" ".join(v for v in w[:3] if v) + " …")

    def _role_options(self, stmt: Statement, i: int, name: str) -> list[str]:
        out: list[str] = []
        while i < len(stmt):
            t, nxt = stmt[i], stmt[i + 1] if i + 1 < len(stmt) else Token("op", "")
            if t.kw(*_ROLE_FLAGS):
                out.append(t.value.upper())
                i += 1
            elif t.kw("CONNECTION") and nxt.kw("LIMIT"):
                end = i + (4 if i + 2 < len(stmt) and stmt[i + 2].value == "-" else 3)
                out.append(f"CONNECTION LIMIT {int(_value(stmt[i + 2 : end]))}")
                i = end
            elif t.kw("VALID") and nxt.kw("UNTIL") and i + 2 < len(stmt):
                out.append(f"VALID UNTIL {quote_literal(self._s(stmt[i + 2]))}")
                i += 3
            elif t.kw("PASSWORD") or (t.kw("ENCRYPTED") and nxt.kw("PASSWORD")):
                i += 1 if t.kw("PASSWORD") else 2
                if i >= len(stmt):
                    raise SqlSyntaxError(f"role {name}: PASSWORD without a value")
                out.append("PASSWORD NULL" if stmt[i].kw("NULL") else f"PASSWORD {quote_literal(self._s(stmt[i]))}")
                i += 1
            else:
                what = repr(t.value.upper()) if t.kind == "word" else f"a {t.kind}"
                raise SqlSyntaxError(f"role {name}: {what} is not a role attribute kybdr-agent knows")
        return out

    def _grant(self, stmt: Statement, verb: str) -> None:
        g = self.globals
        on = _find(stmt, 1, "ON")
        sep = _find(stmt, 1, "TO" if verb == "GRANT" else "FROM")
        end = _find(stmt, sep + 1, "WITH", "GRANTED", "CASCADE", "RESTRICT")
        grantees = [None if t.kw("PUBLIC") else self._n(t) for item in _split(stmt, sep + 1, end) for t in item[-1:]]
        if on == len(stmt) and verb == "GRANT":  # a role membership: GRANT group TO member [WITH …] [GRANTED BY …]
            by = _find(stmt, end, "GRANTED")
            options = tuple(_keywords(item) for item in _split(stmt, end + 1, by))
            for group in _names(stmt[1:sep]):
                for member in grantees:
                    if member is not None:
                        g.memberships.append(Membership(group, member, options))
            return
        kind = stmt[on + 1].value.upper() if on + 1 < len(stmt) and stmt[on + 1].kind == "word" else ""
        if kind not in ("PARAMETER", "TABLESPACE"):
            g.skipped.append(f"{verb} … ON {kind or '…'}")
            return
        privileges = ", ".join(_keywords(item) for item in _split(stmt, 1, on))
        grant_option = verb == "GRANT" and end < len(stmt) and stmt[end].kw("WITH")
        for item in _split(stmt, on + 2, sep):
            target = f"{kind} {_dotted(item)}"
            for who in grantees:
                privilege = Privilege(verb, privileges, target, who, grant_option)
                if kind == "PARAMETER":
                    g.parameter_privileges.append(privilege)
                elif len(item) == 1 and self._n(item[0]) in g.tablespaces:
                    g.tablespaces[self._n(item[0])].privileges.append(privilege)


def _keywords(tokens: Statement) -> str:
    """Privilege names and grant options (``ALTER SYSTEM``, ``ADMIN OPTION``): bare keywords and nothing else."""
    if not tokens or any(t.kind != "word" for t in tokens):
        raise SqlSyntaxError("a privilege or grant option is not a keyword")
    return " ".join(t.value.upper() for t in tokens)


def _find_op(stmt: Statement, op: str) -> int:
    return next((i for i, t in enumerate(stmt) if t.kind == "op" and t.value == op), len(stmt))


# --- the plan ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetState:
    """What the target server has: its roles and tablespaces, and who the agent is there."""

    roles: frozenset[str]
    tablespaces: frozenset[str]
    current_user: str


@dataclass
class GlobalsPlan:
    roles_created: list[str] = field(default_factory=list)
    roles_existing: list[str] = field(default_factory=list)
    roles_not_created: list[str] = field(default_factory=list)  # protected names the target lacks
    tablespaces_created: list[Tablespace] = field(default_factory=list)
    tablespaces_existing: list[str] = field(default_factory=list)
    memberships_granted: list[str] = field(default_factory=list)
    settings_applied: int = 0
    statements: list[str] = field(default_factory=list)  # one transaction, after the tablespaces exist
    skipped: list[str] = field(default_factory=list)

    @property
    def roles_after(self) -> set[str]:
        return {*self.roles_created, *self.roles_existing}


def plan_globals(g: Globals, target: TargetState) -> GlobalsPlan:
    """The statements that create what the target lacks, and the report of what it already had."""
    plan = GlobalsPlan(skipped=list(g.skipped))
    protected = PROTECTED_ROLES | {target.current_user}
    for role in g.roles.values():
        if role.name in target.roles:
            plan.roles_existing.append(role.name)
        elif role.name in protected or role.name.startswith("pg_"):
            plan.roles_not_created.append(role.name)
        else:
            plan.roles_created.append(role.name)
    created, present = set(plan.roles_created), target.roles | set(plan.roles_created)
    sql = plan.statements
    for name in plan.roles_created:
        role = g.roles[name]
        sql.append(f"CREATE ROLE {quote_ident(name)}" + (f" WITH {' '.join(role.options)}" if role.options else ""))
        if role.comment is not None:
            sql.append(f"COMMENT ON ROLE {quote_ident(name)} IS {quote_literal(role.comment)}")
        sql += [f"ALTER ROLE {quote_ident(name)} {setting}" for setting in role.settings]
        plan.settings_applied += len(role.settings)
    for m in g.memberships:
        if m.member not in created:
            continue  # an existing role's memberships stay as they are
        if m.group not in present:
            plan.skipped.append(f"membership of {m.member} in {m.group}: {m.group} is not on the server")
            continue
        sql.append(
            f"GRANT {quote_ident(m.group)} TO {quote_ident(m.member)}"
            + (f" WITH {', '.join(m.options)}" if m.options else "")
        )
        plan.memberships_granted.append(f"{m.member} in {m.group}")
    sql += [p.sql() for p in g.parameter_privileges if p.grantee in created]
    for space in g.tablespaces.values():
        if space.name in target.tablespaces:
            plan.tablespaces_existing.append(space.name)
            continue
        plan.tablespaces_created.append(space)
        q = quote_ident(space.name)
        if space.owner in present:
            sql.append(f"ALTER TABLESPACE {q} OWNER TO {quote_ident(space.owner or '')}")
        if space.options:
            sql.append(f"ALTER TABLESPACE {q} SET {space.options}")
        sql += [p.sql() for p in space.privileges if p.grantee is None or p.grantee in present]
        if space.comment is not None:
            sql.append(f"COMMENT ON TABLESPACE {q} IS {quote_literal(space.comment)}")
    return plan


# --- roles a database's schema names -------------------------------------------------------------------------

_NOT_ROLES: Final = frozenset({"PUBLIC", "CURRENT_USER", "SESSION_USER", "CURRENT_ROLE", "GROUP"})


def _depth_zero(stmt: Statement, start: int, *words: str) -> int | None:
    """Index of the first unquoted keyword among ``words`` outside parentheses, from ``start``."""
    depth = 0
    for i in range(start, len(stmt)):
        t = stmt[i]
        if t.kind == "op" and t.value == "(":
            depth += 1
        elif t.kind == "op" and t.value == ")":
            depth -= 1
        elif depth == 0 and t.kw(*words):
            return i
    return None


def _role_list(stmt: Statement, start: int, *stops: str) -> list[str]:
    names: list[str] = []
    for t in stmt[start:]:
        if t.kw(*stops):
            break
        if t.kind in ("word", "ident", "string") and not t.kw(*_NOT_ROLES):
            names.append(t.value if t.kind != "word" else t.value.lower())
    return names


class SchemaNeeds:
    """What a schema script needs the server to have: every role it names — object owners, grantees and
    grantors, default-privilege roles, policy roles, user-mapping users, session authorisations — and every
    tablespace it puts objects in (``SET default_tablespace``). Fed statement by statement."""

    def __init__(self) -> None:
        self.encoding = "UTF8"
        self.roles: set[str] = set()
        self.tablespaces: set[str] = set()

    def add(self, stmt: Statement) -> None:
        if not stmt:
            return
        encoding = client_encoding(stmt)
        if encoding is not None:
            self.encoding = encoding
        if len(stmt) == 4 and stmt[0].kw("SET") and stmt[1].kw("DEFAULT_TABLESPACE") and stmt[3].value:
            self.tablespaces.add(decode_name(stmt[3].name or stmt[3].value, self.encoding))
        for raw in self._names(stmt):
            self.roles.add(decode_name(raw, self.encoding))

    def _names(self, stmt: Statement) -> list[str]:
        first = stmt[0]
        if first.kw("ALTER") and len(stmt) >= 4 and stmt[-3].kw("OWNER") and stmt[-2].kw("TO"):
            return _role_list(stmt, len(stmt) - 1)
        if first.kw("ALTER") and len(stmt) > 4 and stmt[1].kw("DEFAULT") and stmt[3].kw("FOR"):
            verb = _depth_zero(stmt, 4, "GRANT", "REVOKE")
            owners = _role_list(stmt, 5, "IN", "GRANT", "REVOKE")
            return owners + (self._grant(stmt, verb) if verb is not None else [])
        if first.kw("GRANT", "REVOKE"):
            return self._grant(stmt, 0)
        if first.kw("CREATE") and len(stmt) > 2 and stmt[1].kw("POLICY"):
            to = _depth_zero(stmt, 2, "TO")
            return _role_list(stmt, to + 1, "USING", "WITH") if to is not None else []
        if first.kw("CREATE") and len(stmt) > 4 and stmt[1].kw("USER") and stmt[2].kw("MAPPING"):
            return _role_list(stmt, 4, "SERVER")
        if first.kw("CREATE") and len(stmt) > 2 and stmt[1].kw("SCHEMA"):
            auth = _depth_zero(stmt, 2, "AUTHORIZATION")
            return _role_list(stmt, auth + 1)[:1] if auth is not None else []
        if first.kw("SET") and len(stmt) > 3 and stmt[1].kw("SESSION") and stmt[2].kw("AUTHORIZATION"):
            return [] if stmt[3].kw("DEFAULT") else _role_list(stmt, 3)[:1]
        return []

    @staticmethod
    def _grant(stmt: Statement, verb: int) -> list[str]:
        sep = _depth_zero(stmt, verb + 1, "TO" if stmt[verb].kw("GRANT") else "FROM")
        if sep is None:
            return []
        names = _role_list(stmt, sep + 1, "WITH", "GRANTED", "CASCADE", "RESTRICT")
        by = _depth_zero(stmt, sep + 1, "GRANTED")
        return names + (_role_list(stmt, by + 2)[:1] if by is not None else [])
