"""Keeping secrets out of manifests, logs and error messages: the one place for it (no torch).

- URLs: :func:`redact_url` drops user info (keys, passwords) and query strings (signatures);
  :func:`scrub_urls` does that to every URL in a text, and hides given secret values (the
  credentials of a location's ``storage_options``, found by :func:`secret_values`). Storage
  errors, log records and save events go through it.
- Provenance: secret-looking names, token-shaped values, URL credentials, as follows.

A *name* (environment variable, config key, command-line option) is secret-looking when, upper-cased
with every non-alphanumeric character turned into ``_``, it starts with one of
:data:`SECRET_PREFIXES` or contains one of :data:`SECRET_WORDS` outside the words "tokenizer",
"tokenization", "author" (``TOKENIZER_TOKEN`` is secret-looking, ``TOKENIZER`` is not). The
value under such a name is replaced by :data:`REDACTED`; nothing derived from it (length, hash,
prefix) is kept. Values under other names are still scrubbed of credentials inside URLs
(``scheme://user:pass@host``) and of strings shaped like well-known access tokens.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "<redacted>"
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "PRIVATE")
SECRET_PREFIXES = ("AWS_", "HF_", "GOOGLE_APPLICATION")

# Words that contain a secret word but name no secret; common in training configs ("tokenizer").
_BENIGN = re.compile(r"TOKENIZ(?:ER|ERS|ED|ATION)|AUTHORS?")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_TOKEN_SHAPES = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{20,}|xox[abposr]-[A-Za-z0-9-]{10,}"
    r"|glpat-[A-Za-z0-9_-]{20,}|AIza[0-9A-Za-z_-]{35})\b")


def normalize_name(name: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", name.upper())


def is_secret_name(name: str) -> bool:
    """True if ``name`` looks like it names a secret (see the module docstring)."""
    norm = normalize_name(name)
    if norm.lstrip("_").startswith(SECRET_PREFIXES):
        return True
    norm = _BENIGN.sub("_", norm)
    return any(w in norm for w in SECRET_WORDS)


def scrub_text(text: str) -> str:
    """``text`` with URL credentials and token-shaped substrings replaced by ``<redacted>``."""
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    return _TOKEN_SHAPES.sub(REDACTED, text)


def redact_tree(value: Any, path: str = "config") -> Any:
    """A JSON copy of ``value`` with the values of secret-looking keys replaced, recursively.

    Accepts mappings with ``str`` keys, lists and tuples (become lists), ``str``, ``int``,
    ``float`` (non-finite ones become the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, as the
    manifest's JSON has no such numbers), ``bool`` and ``None``. Anything else raises ``TypeError``
    naming its key path.
    """
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{path}: key {k!r} is not a str")
            out[k] = REDACTED if is_secret_name(k) else redact_tree(v, f"{path}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [redact_tree(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        return scrub_text(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):  # int, IntEnum, NumPy integers
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    raise TypeError(f"{path}: {type(value).__name__} is not JSON-serialisable; pass str(value) "
                    f"or a plain dict/list")


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with the values of secret-looking options replaced.

    Handles ``--name=value``, ``--name value``, ``-n value`` and ``name=value`` (Hydra-style
    overrides); every argument is also scrubbed of URL credentials and token-shaped text.
    """
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            hide_next = False
            if not arg.startswith("-") or _is_number(arg):
                out.append(REDACTED)
                continue
        name, sep, _value = arg.partition("=")
        if sep and is_secret_name(name.lstrip("-+~")):
            out.append(f"{name}={REDACTED}")
            continue
        if not sep and arg.startswith("-") and not _is_number(arg) and is_secret_name(arg):
            hide_next = True
        out.append(scrub_text(arg))
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------ URLs and options
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{},;]+")
_SECRET_OPTION = re.compile(r"key|secret|token|passw|credential|signature|sas", re.IGNORECASE)
HIDDEN = "***"


def redact_url(url: str) -> str:
    """A URL safe to print: user info (keys, passwords) and query strings removed."""
    parts = urlsplit(url)
    if not parts.scheme or parts.scheme == "file":
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def secret_values(options: Any) -> set[str]:
    """String values of credential-like keys anywhere in ``options`` (fsspec kwargs)."""
    found: set[str] = set()
    if isinstance(options, Mapping):
        for k, v in options.items():
            if isinstance(v, str) and len(v) >= 4 and _SECRET_OPTION.search(str(k)):
                found.add(v)
            else:
                found |= secret_values(v)
    return found


def scrub_urls(text: str, urls: Iterable[str] = (), secrets: Iterable[str] = ()) -> str:
    """``text`` with each of ``urls`` (raw location URLs) replaced by its redacted form, every
    other URL in it redacted too, and each of ``secrets`` replaced by ``***``."""
    for url in sorted(set(urls), key=len, reverse=True):
        if url:
            text = text.replace(url, redact_url(url))
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    return text
