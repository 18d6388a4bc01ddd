"""PURE. The SQL that pg_dumpall and pg_restore write, cut into statements of tokens — read, never run as is.

``globals_plan`` builds on this: it reads ``pg_dumpall --globals-only`` into roles and tablespaces and decides
what a restore creates, and collects the roles a database's schema script names. Reading the statements
instead of piping them to psql is what lets a restore leave existing roles alone (pg_dumpall writes
``CREATE ROLE x; ALTER ROLE x WITH …`` for every role, which would fail on the first existing one or reset its
attributes and password) and quote every name itself.

The tokenizer follows PostgreSQL's lexical rules for what these tools emit: single-quoted and ``E''``
strings, double-quoted identifiers (``""`` escapes), dollar quoting (function bodies), ``--`` and nested
``/* */`` comments, and psql meta-commands (``\\restrict``) as statements of their own. It is incremental:
``StatementReader.feed`` takes any chunk and returns the statements completed so far, holding only the one
unfinished statement, so a large schema streams through bounded memory. A script in a database encoding
other than UTF-8 is fed as latin-1 (one char per byte, so every byte survives) and its names decoded from
the script's ``client_encoding`` (``decode_name``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from kybdr_agent.errors import KybdrError

Kind = Literal["word", "ident", "string", "number", "op", "meta"]


class SqlSyntaxError(KybdrError):
    """The SQL ends inside a quote or a comment, or a statement is not one this reader understands."""


@dataclass(frozen=True, slots=True)
class Token:
    kind: Kind
    value: str

    def kw(self, *words: str) -> bool:
        """An unquoted keyword among ``words`` (upper case)."""
        return self.kind == "word" and self.value.upper() in words

    @property
    def name(self) -> str | None:
        """The identifier this token names (unquoted ones fold to lower case), or None if it names none."""
        if self.kind == "ident":
            return self.value
        if self.kind == "word":
            return self.value.lower()
        return None


Statement = tuple[Token, ...]

_SPACE: Final = re.compile(r"\s+")
_WORD: Final = re.compile(r"[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*")
_NUMBER: Final = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_STRING: Final = re.compile(r"'((?:[^']|'')*)'")
_ESTRING: Final = re.compile(r"[eE]'((?:[^'\\]|\\.|'')*)'", re.DOTALL)
_IDENT: Final = re.compile(r'"((?:[^"]|"")*)"')
_DOLLAR: Final = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")
_DOLLAR_PREFIX: Final = re.compile(r"\$[A-Za-z0-9_\x80-\U0010ffff]*\Z")
_COMMENT_MARK: Final = re.compile(r"/\*|\*/")
_E_ESCAPE: Final = re.compile(r"\\(x[0-9A-Fa-f]{1,2}|[0-7]{1,3}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|.)", re.DOTALL)
_E_SIMPLE: Final = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _unescape(body: str) -> str:
    def one(m: re.Match[str]) -> str:
        s = m.group(1)
        if s[0] in "xuU":
            return chr(int(s[1:], 16))
        if s[0].isdigit():
            return chr(int(s, 8))
        return _E_SIMPLE.get(s, s)

    return _E_ESCAPE.sub(one, body.replace("''", "'"))


class _More(Exception):
    """The token at the read position may continue in the next chunk."""


class StatementReader:
    """Cuts SQL text into statements (lists of tokens, without comments and the ``;``), chunk by chunk."""

    def __init__(self) -> None:
        self._buf = ""
        self._pos = 0
        self._tokens: list[Token] = []
        self._dollar_from = 0  # where the search for an open dollar quote's end resumes

    def feed(self, text: str) -> list[Statement]:
        self._buf = self._buf[self._pos :] + text
        self._dollar_from = max(0, self._dollar_from - self._pos)
        self._pos = 0
        return self._scan(final=False)

    def finish(self) -> list[Statement]:
        done = self._scan(final=True)
        if self._tokens:
            done.append(tuple(self._tokens))
            self._tokens = []
        return done

    def _scan(self, *, final: bool) -> list[Statement]:
        done: list[Statement] = []
        while True:
            space = _SPACE.match(self._buf, self._pos)
            if space:
                self._pos = space.end()
            if self._pos >= len(self._buf):
                return done
            try:
                token = self._token(final)
            except _More:
                return done
            if token is None:  # a comment
                continue
            if token.kind == "meta" or (token.kind == "op" and token.value == ";"):
                if self._tokens:
                    done.append(tuple(self._tokens))
                if token.kind == "meta":
                    done.append((token,))
                self._tokens = []
            else:
                self._tokens.append(token)

    def _take(self, match: re.Match[str] | None, final: bool, quote: str = "", ahead: int = 1) -> re.Match[str]:
        """A match is final only if more text could not extend it: ``ahead`` characters follow it (a number's
        ``e+3`` needs three), and a quoted form does not end just before a quote, which would make the quote
        it ended on half of a doubled one."""
        end = match.end() if match is not None else 0
        if match is None or ((end + ahead > len(self._buf) or (quote and self._buf[end] == quote)) and not final):
            if not final:
                raise _More
            raise SqlSyntaxError("the SQL ends inside a quoted string or identifier")
        self._pos = match.end()
        return match

    def _token(self, final: bool) -> Token | None:
        buf, i = self._buf, self._pos
        c = buf[i]
        nxt = buf[i + 1] if i + 1 < len(buf) else ""
        if not nxt and not final:  # every form is told apart by its first two characters
            raise _More
        if (c == "-" and nxt == "-") or c == "\\":
            end = buf.find("\n", i)
            if end < 0:
                if not final:
                    raise _More
                end = len(buf)
            self._pos = end
            return Token("meta", buf[i:end].strip()) if c == "\\" else None
        if c == "/" and nxt == "*":
            self._pos = self._comment_end(i, final)
            return None
        if c in "eE" and nxt == "'":
            return Token("string", _unescape(self._take(_ESTRING.match(buf, i), final, "'").group(1)))
        if c == "'":
            return Token("string", self._take(_STRING.match(buf, i), final, "'").group(1).replace("''", "'"))
        if c == '"':
            return Token("ident", self._take(_IDENT.match(buf, i), final, '"').group(1).replace('""', '"'))
        if c == "$":
            return self._dollar(i, final)
        if _WORD.match(c):
            return Token("word", self._take(_WORD.match(buf, i), final).group())
        if c.isdigit() or (c == "." and nxt.isdigit()):
            return Token("number", self._take(_NUMBER.match(buf, i), final, ahead=3).group())
        self._pos = i + 2 if buf.startswith("::", i) else i + 1
        return Token("op", buf[i : self._pos])

    def _comment_end(self, start: int, final: bool) -> int:
        depth = 0
        for mark in _COMMENT_MARK.finditer(self._buf, start):
            depth += 1 if mark.group() == "/*" else -1
            if depth == 0:
                return mark.end()
        if final:
            raise SqlSyntaxError("the SQL ends inside a /* comment */")
        raise _More

    def _dollar(self, i: int, final: bool) -> Token:
        buf = self._buf
        opener = _DOLLAR.match(buf, i)
        if opener is None:
            if not final and _DOLLAR_PREFIX.match(buf, i):
                raise _More
            self._pos = i + 1
            return Token("op", "$")
        tag = opener.group()
        close = buf.find(tag, max(opener.end(), self._dollar_from))
        if close < 0:
            if final:
                raise SqlSyntaxError("the SQL ends inside a dollar-quoted string")
            self._dollar_from = max(opener.end(), len(buf) - len(tag) + 1)
            raise _More
        self._pos, self._dollar_from = close + len(tag), 0
        return Token("string", buf[opener.end() : close])


# --- names and encodings --------------------------------------------------------------------------------

_PG_CODECS: Final = {
    "UTF8": "utf-8",
    "SQL_ASCII": "utf-8",
    "LATIN1": "latin-1",
    "LATIN2": "iso8859-2",
    "LATIN9": "iso8859-15",
    "WIN1250": "cp1250",
    "WIN1251": "cp1251",
    "WIN1252": "cp1252",
    "KOI8R": "koi8-r",
    "EUC_JP": "euc_jp",
    "EUC_KR": "euc_kr",
    "EUC_CN": "gb2312",
}


def decode_name(value: str, encoding: str) -> str:
    """A name read from latin-1-decoded text, as the server spells it (``encoding`` is the dump's)."""
    codec = _PG_CODECS.get(encoding.upper().replace("-", "_"), "utf-8")
    return value.encode("latin-1", "replace").decode(codec, "replace")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """A string literal that means the same whatever ``standard_conforming_strings`` is."""
    if "\x00" in text:
        raise SqlSyntaxError("a string holds a NUL byte, which PostgreSQL cannot store")
    quoted = text.replace("'", "''")
    return f"E'{quoted.replace(chr(92), chr(92) * 2)}'" if "\\" in text else f"'{quoted}'"


def client_encoding(stmt: Statement) -> str | None:
    """``SET client_encoding = 'X'`` (or ``TO``): the encoding of the text that follows."""
    if len(stmt) >= 4 and stmt[0].kw("SET") and stmt[1].kw("CLIENT_ENCODING") and stmt[3].kind == "string":
        return stmt[3].value
    return None
