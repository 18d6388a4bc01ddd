"""The SQL tokenizer the globals are read with (kybdr_agent/backup/globals_sql.py): every lexical form pg_dumpall
and pg_restore write, the same statements however the text is chunked, and quoting that always reads back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.backup.globals_sql import (
    SqlSyntaxError,
    Statement,
    StatementReader,
    Token,
    client_encoding,
    decode_name,
    quote_ident,
    quote_literal,
)

SCRIPT = r"""--
-- PostgreSQL database dump
--

\restrict abcDEF123

SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
/* a /* nested */ comment; with a semicolon */
CREATE FUNCTION app.f(x integer) RETURNS text
    LANGUAGE plpgsql
    AS $_$ begin return 'a;b' || $1 || $$;$$; end $_$;
ALTER FUNCTION app.f(x integer) OWNER TO "we""ird role";
COMMENT ON TABLE app.t IS 'it''s; fine';
COMMENT ON TABLE app.u IS E'tab\there\\ and \'quote\'';
GRANT SELECT(a, "b;c") ON TABLE app.t TO readers; -- trailing comment; with semicolon
SELECT 1.5e3, .5, a::text, $1 FROM x$y;
\unrestrict abcDEF123
"""


def _read(text: str, cuts: list[int] | None = None) -> list[Statement]:
    reader = StatementReader()
    done: list[Statement] = []
    last = 0
    for cut in sorted(set(cuts or [])):
        done += reader.feed(text[last:cut])
        last = cut
    done += reader.feed(text[last:])
    return done + reader.finish()


def _values(stmt: Statement) -> list[str]:
    return [t.value for t in stmt]


def test_every_lexical_form() -> None:
    stmts = _read(SCRIPT)
    assert stmts[0] == (Token("meta", r"\restrict abcDEF123"),)
    assert stmts[-1] == (Token("meta", r"\unrestrict abcDEF123"),)
    function = stmts[3]
    assert function[0].kw("CREATE")
    assert function[1].kw("FUNCTION")
    assert Token("string", " begin return 'a;b' || $1 || $$;$$; end ") in function
    assert stmts[4][-1] == Token("ident", 'we"ird role')
    assert stmts[5][-1] == Token("string", "it's; fine")
    assert stmts[6][-1] == Token("string", "tab\there\\ and 'quote'")
    grant = stmts[7]
    assert Token("ident", "b;c") in grant
    assert grant[-1] == Token("word", "readers")
    assert _values(stmts[8]) == ["SELECT", "1.5e3", ",", ".5", ",", "a", "::", "text", ",", "$", "1", "FROM", "x$y"]
    assert len(stmts) == 10


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(SCRIPT)), max_size=40))
def test_chunking_never_changes_the_statements(cuts: list[int]) -> None:
    assert _read(SCRIPT, cuts) == _read(SCRIPT)


def test_one_character_at_a_time() -> None:
    assert _read(SCRIPT, list(range(len(SCRIPT)))) == _read(SCRIPT)


@pytest.mark.parametrize(
    "text",
    ["select 'open", 'select "open', "select $$ open", "select $tag$ open $tg$", "/* open", "/* /* */ open", "E'\\'"],
)
def test_unterminated_text_is_an_error_at_the_end(text: str) -> None:
    reader = StatementReader()
    assert reader.feed(text) == []
    with pytest.raises(SqlSyntaxError):
        reader.finish()


def test_a_last_statement_without_semicolon_is_kept() -> None:
    assert _values(_read("select 1; select 2")[1]) == ["select", "2"]


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=40))
def test_quoting_reads_back(text: str) -> None:
    [stmt] = _read(f"COMMENT ON ROLE {quote_ident(text)} IS {quote_literal(text)};")
    assert stmt[3] == Token("ident", text)
    assert stmt[5] == Token("string", text)


def test_quote_literal_refuses_nul() -> None:
    with pytest.raises(SqlSyntaxError):
        quote_literal("a\x00b")


def test_names_decode_from_the_scripts_encoding() -> None:
    latin1 = "caf\u00e9".encode("latin-1").decode("latin-1")
    utf8 = "caf\u00e9".encode().decode("latin-1")
    assert decode_name(latin1, "LATIN1") == "caf\u00e9"
    assert decode_name(utf8, "UTF8") == "caf\u00e9"
    assert client_encoding(_read("SET client_encoding = 'LATIN1';")[0]) == "LATIN1"
    assert client_encoding(_read("SET search_path = 'x';")[0]) is None
