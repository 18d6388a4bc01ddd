"""libpq connection strings (kybdr_agent/postgres/conninfo.py): URI and key=value parsing as libpq does it,
every documented parameter accepted and unknown ones refused, multi-host lists read with libpq's rules, and
passwords kept out of error messages and masked output."""

from __future__ import annotations

import string
from urllib.parse import quote

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kybdr_agent.postgres.conninfo import (
    KNOWN_PARAMS,
    NO_ENV_PARAMS,
    PARAM_ENV,
    ConninfoError,
    Endpoint,
    check_addresses,
    endpoints,
    env_params,
    libpq_env,
    mask_dsn,
    parse_dsn,
)

SECRET = "Hunter2-Sekr1t"
HIDDEN = "<unparseable DSN hidden>"

known_keys = st.sampled_from(sorted(PARAM_ENV))
values = st.text(max_size=20)
secrets_ = st.text(alphabet=string.ascii_letters + string.digits, min_size=12, max_size=24).map(lambda s: "PW" + s)
separators = st.sampled_from([" ", "  ", "\t", "\n", " \n\t "])
around_eq = st.sampled_from(["=", " =", "= ", " = ", "\t=\t"])


def quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def unquoted(value: str) -> str:
    """libpq's unquoted form: backslash escapes anything that would end or start a quoted value."""
    return "".join("\\" + c if c.isspace() or c in "\\'" else c for c in value)


# ------------------------------------------------------------------------------------------- key=value


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("", {}),
        ("   \n\t ", {}),
        ("host=/run/postgresql", {"host": "/run/postgresql"}),
        ("host=db port=5433 user=backup", {"host": "db", "port": "5433", "user": "backup"}),
        ("  host = db   port =5433\tuser=  backup  ", {"host": "db", "port": "5433", "user": "backup"}),
        ("password='with spaces' user=a", {"password": "with spaces", "user": "a"}),
        ("password='it\\'s' user=a", {"password": "it's", "user": "a"}),
        ("password='back\\\\slash'", {"password": "back\\slash"}),
        ("password=''", {"password": ""}),
        ("password='' host=db", {"password": "", "host": "db"}),
        ("password=a\\ b", {"password": "a b"}),
        ("password=a\\\\b", {"password": "a\\b"}),
        ("password=it's", {"password": "it's"}),
        ("password=a=b=c", {"password": "a=b=c"}),
        ("options='-c statement_timeout=0'", {"options": "-c statement_timeout=0"}),
        ("host=a host=b", {"host": "b"}),
        ("dbname='my db' application_name=kybdr", {"dbname": "my db", "application_name": "kybdr"}),
    ],
)
def test_parse_keyvalue(dsn: str, expected: dict[str, str]) -> None:
    assert parse_dsn(dsn) == expected


@given(
    st.dictionaries(known_keys, values, min_size=1, max_size=6),
    st.data(),
)
@settings(max_examples=300)
def test_parse_keyvalue_round_trip(params: dict[str, str], data: st.DataObject) -> None:
    pieces = []
    for key, value in params.items():
        # A value ending in whitespace is quoted: see test_trailing_escaped_space_is_kept for the unquoted form.
        use_quotes = data.draw(st.booleans(), label=f"quote {key}") or value == "" or value[-1].isspace()
        rendered = quoted(value) if use_quotes else unquoted(value)
        pieces.append(key + data.draw(around_eq, label="eq") + rendered)
    dsn = data.draw(separators, label="lead") + data.draw(separators, label="sep").join(pieces)
    assert parse_dsn(dsn) == params


def test_trailing_escaped_space_is_kept() -> None:
    assert parse_dsn("host=db password=abc\\ ") == {"host": "db", "password": "abc "}


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("host", "no '='"),
        ("host=db port", "no '='"),
        ("password='abc", "unterminated"),
        ("foo=bar", "foo"),
        ("host=db sslmode=require ssl=true", "ssl"),
        ("=x", "not key=value pairs"),
    ],
)
def test_parse_keyvalue_errors(dsn: str, message: str) -> None:
    with pytest.raises(ConninfoError, match=message):
        parse_dsn(dsn)


def test_unknown_keys_are_all_named_sorted() -> None:
    with pytest.raises(ConninfoError, match="does not know: alpha, zulu"):
        parse_dsn("zulu=1 host=db alpha=2")


# ------------------------------------------------------------------------------------------------- URI


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://", {}),
        ("postgres://db/app", {"host": "db", "dbname": "app"}),
        ("postgresql://db/", {"host": "db"}),
        ("postgresql://db:5433", {"host": "db", "port": "5433"}),
        ("postgresql://backup@db/app", {"user": "backup", "host": "db", "dbname": "app"}),
        (
            "postgresql://backup:s3cr%40t%3A%2F@db.example.com:5433/app?sslmode=require&application_name=kybdr",
            {
                "user": "backup",
                "password": "s3cr@t:/",
                "host": "db.example.com",
                "port": "5433",
                "dbname": "app",
                "sslmode": "require",
                "application_name": "kybdr",
            },
        ),
        ("postgresql://a:p@ss@db/app", {"user": "a", "password": "p@ss", "host": "db", "dbname": "app"}),
        ("postgresql:///app?host=/run/postgresql", {"dbname": "app", "host": "/run/postgresql"}),
        ("postgresql://%2Frun%2Fpostgresql/app", {"host": "/run/postgresql", "dbname": "app"}),
        ("postgresql://db/my%20db", {"host": "db", "dbname": "my db"}),
        (
            "postgresql://db/app?options=-c%20search_path%3Dx",
            {"host": "db", "dbname": "app", "options": "-c search_path=x"},
        ),
        ("  postgresql://db/app  ", {"host": "db", "dbname": "app"}),
        ("postgresql://db/app?connect_timeout=", {"host": "db", "dbname": "app", "connect_timeout": ""}),
    ],
)
def test_parse_uri(dsn: str, expected: dict[str, str]) -> None:
    assert parse_dsn(dsn) == expected


@given(
    user=st.none() | st.text(min_size=1, max_size=12),
    password=st.none() | st.text(min_size=1, max_size=12),
    host=st.none() | st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True),
    port=st.none() | st.integers(1, 65535).map(str),
    dbname=st.none() | st.text(min_size=1, max_size=12),
    query=st.dictionaries(st.sampled_from(["sslmode", "application_name", "options", "connect_timeout"]), values),
)
@settings(max_examples=300)
def test_parse_uri_round_trip(
    user: str | None,
    password: str | None,
    host: str | None,
    port: str | None,
    dbname: str | None,
    query: dict[str, str],
) -> None:
    assume(password is None or user is not None)
    assume(port is None or host is not None)
    userinfo = ""
    if user is not None:
        userinfo = quote(user, safe="")
        if password is not None:
            userinfo += ":" + quote(password, safe="")
        userinfo += "@"
    netloc = userinfo + (host or "") + (f":{port}" if port else "")
    path = "/" + quote(dbname, safe="") if dbname is not None else ""
    qs = "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
    dsn = f"postgresql://{netloc}{path}" + (f"?{qs}" if qs else "")
    expected = {
        k: v
        for k, v in {"user": user, "password": password, "host": host, "port": port, "dbname": dbname}.items()
        if v is not None
    }
    expected.update(query)
    assert parse_dsn(dsn) == expected


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("postgresql://db:port/app", "port is not a number"),
        ("postgresql://db:-1/app", "port is not a number"),
        ("postgresql://db/app?foo=bar", "foo"),
        ("postgresql://db/app?ssl=true", "ssl"),
    ],
)
def test_parse_uri_errors(dsn: str, message: str) -> None:
    with pytest.raises(ConninfoError, match=message):
        parse_dsn(dsn)


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://[::1]:5433/db", {"host": "::1", "port": "5433", "dbname": "db"}),
        ("postgresql://u@[2001:db8::1]/db", {"user": "u", "host": "2001:db8::1", "dbname": "db"}),
    ],
)
def test_parse_uri_ipv6_host(dsn: str, expected: dict[str, str]) -> None:
    assert parse_dsn(dsn) == expected


def test_parse_uri_plus_in_query_is_literal() -> None:
    assert parse_dsn("postgresql://db/app?password=a+b")["password"] == "a+b"


def test_parse_uri_malformed_brackets_is_a_conninfo_error() -> None:
    with pytest.raises(ConninfoError):
        parse_dsn(f"postgresql://u:{SECRET}@[::1/db")


# ------------------------------------------------------------------------------------- secrecy of errors


def _malformed_with(secret: str) -> list[str]:
    return [
        f"password={secret} foo=bar",
        f"password={secret} host",
        f"password='{secret}",
        f"password={secret} host='unterminated",
        f"host=db password={secret} port",
        f"postgresql://u:{secret}@db:notaport/app",
        f"postgresql://u:{secret}@db/app?foo=bar",
        f"postgresql://db/app?password={secret}&foo=bar",
        f"password='{secret}' sslcompresion=1",
    ]


@given(secrets_, st.data())
@settings(max_examples=100)
def test_error_messages_never_contain_the_password(secret: str, data: st.DataObject) -> None:
    dsn = data.draw(st.sampled_from(_malformed_with(secret)), label="dsn")
    with pytest.raises(ConninfoError) as info:
        parse_dsn(dsn)
    assert secret not in str(info.value)
    assert secret not in repr(info.value)


def test_missing_equals_after_password_does_not_leak_it() -> None:
    with pytest.raises(ConninfoError) as info:
        parse_dsn(f"password {SECRET} host=db")
    assert SECRET not in str(info.value)


# ------------------------------------------------------------------------------------------------ mask


@pytest.mark.parametrize(
    "dsn",
    ["", "host=db user=backup", "postgresql://backup@db/app", "postgresql://db/app?sslmode=require"],
)
def test_mask_leaves_passwordless_dsn_alone(dsn: str) -> None:
    assert mask_dsn(dsn) == dsn


@pytest.mark.parametrize(
    "dsn",
    [
        f"host=db password={SECRET} user=backup",
        f"host=db password='{SECRET}' user=backup",
        f"postgresql://backup:{SECRET}@db:5432/app",
        f"postgresql://db/app?password={SECRET}",
    ],
)
def test_mask_hides_password(dsn: str) -> None:
    masked = mask_dsn(dsn)
    assert SECRET not in masked
    assert "password=********" in masked
    assert "db" in masked


def test_mask_keeps_the_other_parameters() -> None:
    masked = mask_dsn(f"postgresql://backup:{SECRET}@db.example.com:5433/app?sslmode=require")
    assert parse_dsn(masked) == {
        "user": "backup",
        "password": "********",
        "host": "db.example.com",
        "port": "5433",
        "dbname": "app",
        "sslmode": "require",
    }


@pytest.mark.parametrize("dsn", _malformed_with(SECRET))
def test_mask_hides_unparseable_dsn(dsn: str) -> None:
    assert mask_dsn(dsn) == HIDDEN


@given(st.dictionaries(known_keys.filter(lambda k: k != "password"), values, max_size=5), secrets_, st.data())
@settings(max_examples=200)
def test_mask_never_shows_the_password(params: dict[str, str], secret: str, data: st.DataObject) -> None:
    assume(all(secret not in v for v in params.values()))
    items = [*params.items(), ("password", secret)]
    order = data.draw(st.permutations(items), label="order")
    dsn = " ".join(f"{k}={quoted(v)}" for k, v in order)
    assert secret not in mask_dsn(dsn)
    uri = "postgresql://u:" + quote(secret, safe="") + "@db/app"
    assert secret not in mask_dsn(uri)


def test_mask_hides_dsn_that_urlsplit_rejects() -> None:
    assert mask_dsn(f"postgresql://u:{SECRET}@[::1/db") == HIDDEN


# --------------------------------------------------------------------------------------------- libpq env


def test_param_env_uses_libpq_names() -> None:
    assert PARAM_ENV["host"] == "PGHOST"
    assert PARAM_ENV["dbname"] == "PGDATABASE"
    assert PARAM_ENV["password"] == "PGPASSWORD"
    assert PARAM_ENV["application_name"] == "PGAPPNAME"
    assert PARAM_ENV["connect_timeout"] == "PGCONNECT_TIMEOUT"
    assert PARAM_ENV["target_session_attrs"] == "PGTARGETSESSIONATTRS"
    assert all(name.startswith("PG") and name.isupper() for name in PARAM_ENV.values())
    assert len(set(PARAM_ENV.values())) == len(PARAM_ENV)


def test_libpq_env_from_uri() -> None:
    env = libpq_env(parse_dsn(f"postgresql://backup:{SECRET}@db:5433/app?sslmode=verify-full"))
    assert env == {
        "PGUSER": "backup",
        "PGPASSWORD": SECRET,
        "PGHOST": "db",
        "PGPORT": "5433",
        "PGDATABASE": "app",
        "PGSSLMODE": "verify-full",
    }


@given(st.dictionaries(known_keys, values))
def test_libpq_env_maps_every_key(params: dict[str, str]) -> None:
    env = libpq_env(params)
    assert env == {PARAM_ENV[k]: v for k, v in params.items()}
    assert len(env) == len(params)


def test_libpq_env_of_empty_dsn_is_empty() -> None:
    assert libpq_env(parse_dsn("")) == {}


# ------------------------------------------------------------------------- every libpq parameter, 15-17

# From the PostgreSQL 15, 16 and 17 manuals ("Parameter Key Words", "Environment Variables"), written out
# here rather than read from the module, so a parameter dropped from the code is caught.
LIBPQ_ENV_15_TO_17 = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "passfile": "PGPASSFILE",
    "channel_binding": "PGCHANNELBINDING",
    "require_auth": "PGREQUIREAUTH",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "client_encoding": "PGCLIENTENCODING",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "service": "PGSERVICE",
    "sslmode": "PGSSLMODE",
    "requiressl": "PGREQUIRESSL",
    "sslnegotiation": "PGSSLNEGOTIATION",
    "sslcompression": "PGSSLCOMPRESSION",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcertmode": "PGSSLCERTMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR",
    "sslsni": "PGSSLSNI",
    "requirepeer": "PGREQUIREPEER",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME",
    "gsslib": "PGGSSLIB",
    "gssdelegation": "PGGSSDELEGATION",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "load_balance_hosts": "PGLOADBALANCEHOSTS",
}
LIBPQ_WITHOUT_ENV = [
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "sslpassword",
    "replication",
]


@pytest.mark.parametrize(("param", "env"), sorted(LIBPQ_ENV_15_TO_17.items()))
def test_every_libpq_parameter_with_a_variable_is_accepted_and_passed_on(param: str, env: str) -> None:
    for dsn in (f"host=db {param}=x", f"postgresql://db/app?{param}=x"):
        assert parse_dsn(dsn)[param] == "x"
    assert libpq_env({param: "x"}) == {env: "x"}
    assert env_params({env: "x"}) == {param: "x"}


@pytest.mark.parametrize("param", LIBPQ_WITHOUT_ENV)
def test_libpq_parameters_without_a_variable_are_accepted_but_reach_no_environment(param: str) -> None:
    assert parse_dsn(f"host=db {param}=1") == {"host": "db", param: "1"}
    assert libpq_env({"host": "db", param: "1"}) == {"PGHOST": "db"}


def test_the_known_parameters_are_exactly_libpqs() -> None:
    assert PARAM_ENV == LIBPQ_ENV_15_TO_17
    assert set(LIBPQ_WITHOUT_ENV) == NO_ENV_PARAMS
    assert set(LIBPQ_ENV_15_TO_17) | set(LIBPQ_WITHOUT_ENV) == KNOWN_PARAMS


def test_the_parameters_from_issue_8_are_accepted() -> None:
    dsn = (
        "host=db channel_binding=prefer target_session_attrs=any load_balance_hosts=disable "
        "sslnegotiation=postgres require_auth=scram-sha-256"
    )
    assert libpq_env(parse_dsn(dsn)) == {
        "PGHOST": "db",
        "PGCHANNELBINDING": "prefer",
        "PGTARGETSESSIONATTRS": "any",
        "PGLOADBALANCEHOSTS": "disable",
        "PGSSLNEGOTIATION": "postgres",
        "PGREQUIREAUTH": "scram-sha-256",
    }


@pytest.mark.parametrize("dsn", ["host=db sslmod=require", "postgresql://db/app?target_session_attr=any"])
def test_a_misspelt_parameter_is_still_refused(dsn: str) -> None:
    with pytest.raises(ConninfoError, match="does not know"):
        parse_dsn(dsn)


# ------------------------------------------------------------------------------------------ multi-host


@pytest.mark.parametrize(
    ("dsn", "env"),
    [
        ("postgresql://u@h1:5432,h2:5433/app", {"PGUSER": "u", "PGHOST": "h1,h2", "PGPORT": "5432,5433"}),
        ("postgresql://h1,h2:5433/app", {"PGHOST": "h1,h2", "PGPORT": ",5433"}),
        ("postgresql:///app?host=h1,h2&port=5432,5433", {"PGHOST": "h1,h2", "PGPORT": "5432,5433"}),
        ("host=h1,h2 port=5432,5433", {"PGHOST": "h1,h2", "PGPORT": "5432,5433"}),
        ("postgresql://[::1]:5432,[2001:db8::1]:5433/app", {"PGHOST": "::1,2001:db8::1", "PGPORT": "5432,5433"}),
    ],
)
def test_multi_host_dsns_become_libpqs_list_variables(dsn: str, env: dict[str, str]) -> None:
    got = libpq_env(parse_dsn(dsn))
    got.pop("PGDATABASE", None)
    assert got == env


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, [Endpoint("", "", 5432)]),
        ({"port": "6543"}, [Endpoint("", "", 6543)]),
        ({"host": "h1,h2", "port": "5432,5433"}, [Endpoint("h1", "", 5432), Endpoint("h2", "", 5433)]),
        ({"host": "h1,h2", "port": "6000"}, [Endpoint("h1", "", 6000), Endpoint("h2", "", 6000)]),
        ({"host": "h1,h2", "port": ",5433"}, [Endpoint("h1", "", 5432), Endpoint("h2", "", 5433)]),
        (
            {"host": "/run/postgresql,,h3"},
            [Endpoint("/run/postgresql", "", 5432), Endpoint("", "", 5432), Endpoint("h3", "", 5432)],
        ),
        ({"hostaddr": "10.0.0.1,::1", "port": "1,2"}, [Endpoint("", "10.0.0.1", 1), Endpoint("", "::1", 2)]),
        ({"host": "a,b", "hostaddr": "10.0.0.1,", "port": "1"}, [Endpoint("a", "10.0.0.1", 1), Endpoint("b", "", 1)]),
    ],
)
def test_endpoints_follow_libpqs_list_rules(params: dict[str, str], expected: list[Endpoint]) -> None:
    assert endpoints(params) == expected


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"host": "h1,h2", "port": "1,2,3"}, "3 ports for 2 host"),
        ({"port": "5432,5433"}, "2 ports for 1 host"),
        ({"host": "a", "hostaddr": "10.0.0.1,10.0.0.2"}, "1 host name.* but 2 hostaddr"),
        ({"host": "h", "port": "abc"}, "not a number"),
        ({"host": "h", "port": "0"}, "not a number from 1 to 65535"),
        ({"host": "h", "port": "65536"}, "not a number from 1 to 65535"),
        ({"host": "h1,h2", "port": "5432,-1"}, "not a number"),
        ({"hostaddr": "db.example.com"}, "not a numeric IP address"),
    ],
)
def test_endpoints_refuse_what_libpq_would_refuse_when_connecting(params: dict[str, str], message: str) -> None:
    with pytest.raises(ConninfoError, match=message):
        endpoints(params)


@given(
    st.lists(
        st.tuples(st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True), st.none() | st.integers(1, 65535)),
        min_size=1,
        max_size=4,
    )
)
def test_uri_host_lists_round_trip_to_endpoints(items: list[tuple[str, int | None]]) -> None:
    netloc = ",".join(host + (f":{port}" if port else "") for host, port in items)
    expected = [Endpoint(host, "", port or 5432) for host, port in items]
    assert endpoints(parse_dsn(f"postgresql://u@{netloc}/app")) == expected


def test_check_addresses_judges_what_a_dsn_alone_can_say() -> None:
    check_addresses(parse_dsn("port=5432,5433"))  # the hosts may come from PGHOST
    check_addresses(parse_dsn("host=h1,h2 port=5432,5433"))
    with pytest.raises(ConninfoError, match="not a number"):
        check_addresses(parse_dsn("port=5432,x"))
    with pytest.raises(ConninfoError, match="2 ports for 3 host"):
        check_addresses(parse_dsn("host=a,b,c port=1,2"))


# ------------------------------------------------------------------------------------ mask, more secrets


def test_mask_hides_the_client_key_passphrase_too() -> None:
    masked = mask_dsn(f"host=db sslkey=/k.pem sslpassword={SECRET}")
    assert SECRET not in masked
    assert parse_dsn(masked) == {"host": "db", "sslkey": "/k.pem", "sslpassword": "********"}


def test_masked_dsn_quotes_values_so_it_reads_back_the_same() -> None:
    dsn = f"host=h1,h2 password={SECRET} options='-c search_path=a\\'b' application_name=''"
    masked = mask_dsn(dsn)
    assert SECRET not in masked
    assert parse_dsn(masked) == {**parse_dsn(dsn), "password": "********"}
