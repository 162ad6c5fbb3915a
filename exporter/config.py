"""Configuration: load, validate and freeze the YAML configuration file.

``load_config(path)`` reads a YAML file, validates it against the JSON Schema shipped in
``exporter/schema/config.schema.json`` (published for editors as
``config/gil-exporter.schema.json``), runs the semantic checks the schema cannot express and
returns a frozen :class:`Config`.  ``default_config()`` is what the exporter uses without a file:
one target named ``python`` that selects every CPython process.

Everything wrong with a configuration raises :class:`ConfigError`, never another exception type.
``str(err)`` is one line, ``FILE:LINE: message``.  Line numbers are 1-based and count ``\\n``
characters; their meaning per error class:

* line 0: the file could not be read at all (missing, a directory, permission denied, any other
  OS error, larger than 1 MiB).  Line 0 is used for nothing else.
* not valid UTF-8: line of the first invalid byte.
* YAML syntax / reader / tag errors: line of the problem mark PyYAML reports.
* empty document (empty file, only comments, ``---`` alone): line 1.
* duplicate key within a mapping: line of the second occurrence.
* unknown key: line of that key.
* wrong type, value out of range, bad pattern, invalid regular expression: line of the value
  (for a null/empty value, or a mapping/list value: line of its key; for list items: the item).
* missing required key, empty mapping/list: line of the key that holds the mapping/list (the item
  line for list items, the first line of the document for the top level).
* duplicate target name: line of the second name.
* pid together with pidfile: line of whichever of the two comes later.
* scan_interval_seconds larger than window_seconds: line of window_seconds (of
  scan_interval_seconds when window_seconds is left at its default).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from exporter import targetfile

__all__ = [
    "Config",
    "ConfigError",
    "Limits",
    "Match",
    "Sampling",
    "Target",
    "SCHEMA_PATH",
    "default_config",
    "load_config",
]

SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "config.schema.json"

MAX_FILE_BYTES = 1 << 20
_MAX_DEPTH = 64
_MAX_NODES = 20_000

MATCHER_KEYS = ("cmdline", "comm", "exe", "pid", "pidfile", "user", "cgroup")
_REGEX_KEYS = ("cmdline", "exe", "cgroup")


# --------------------------------------------------------------------------------------------
# Public data model


@dataclass(frozen=True)
class Match:
    """Process matchers; every matcher that is not None must hold."""

    cmdline: re.Pattern | None = None  # re.search in argv joined by single spaces
    comm: str | None = None  # /proc/PID/comm, exact
    exe: re.Pattern | None = None  # re.search in the executable path
    pid: int | None = None
    pidfile: str | None = None  # absolute path, re-read at every scan
    user: str | None = None  # user name or numeric uid, as a string
    cgroup: re.Pattern | None = None  # re.search in /proc/PID/cgroup
    python: bool = False  # only CPython processes (config key: target-level python_only)


@dataclass(frozen=True)
class Target:
    name: str
    match: Match


@dataclass(frozen=True)
class Sampling:
    rate_hz: float = 100.0
    enabled: bool = True
    per_thread: bool = False  # pygil_thread_gil_held_seconds_total (opt-in)


@dataclass(frozen=True)
class Limits:
    max_targets: int = 100  # max processes monitored at once, all targets together
    max_processes_per_target: int = 50
    max_threads_per_process: int = 20  # thread label values per process (rest: thread="other")


@dataclass(frozen=True)
class Config:
    targets: tuple[Target, ...]
    scan_interval_seconds: float = 5.0
    window_seconds: float = 10.0
    sampling: Sampling = field(default_factory=Sampling)
    limits: Limits = field(default_factory=Limits)
    source: str | None = None  # file path, None for the default configuration


class ConfigError(Exception):
    """A configuration problem; ``str(e) == f"{file}:{line}: {message}"`` (one line)."""

    def __init__(self, file: str, line: int, message: str):
        self.file = file
        self.line = line
        self.message = message
        super().__init__(file, line, message)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


def default_config() -> Config:
    """The configuration used without a file: every CPython process, as target ``python``."""
    return Config(targets=(Target(name="python", match=Match(python=True)),), source=None)


# --------------------------------------------------------------------------------------------
# Small formatting helpers (messages must stay on one line)


def _one_line(text: str, limit: int = 300) -> str:
    out = "".join(c if (c.isprintable() or c == " ") else f"\\u{ord(c):04x}" for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _q(value: Any, limit: int = 60) -> str:
    """Quote a key or value for a message: double quotes, escapes, bounded length."""
    s = value if isinstance(value, str) else str(value)
    if len(s) > limit:
        s = s[:limit] + "..."
    return _one_line(json.dumps(s, ensure_ascii=False), limit + 20)


_TYPE_WORDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "nothing",
}


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "boolean " + ("true" if value else "false")
    if isinstance(value, int):
        return f"integer {value}" if abs(value) < 10**30 else "a huge integer"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {_q(value)}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bytes):
        return "binary data"
    return f"{type(value).__name__} {_q(str(value))}"


def _fmt_path(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            out += ("." if out else "") + part
        else:
            out += f"[{_q(part)}]"
    return out


def _num(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


# --------------------------------------------------------------------------------------------
# YAML loading with line numbers


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that builds plain data itself from the node graph.

    While building it records, for every path (tuple of keys / indexes), the 1-based line of the
    key and of the value, rejects duplicate keys and non-string keys, bounds nesting depth and the
    number of nodes (recursive aliases, alias bombs) and supports ``<<`` merge keys.
    """

    def __init__(self, text: str, file: str):
        super().__init__(text)
        self.text = text
        self.file = file
        self.lines: dict[tuple[Any, ...], tuple[int, int]] = {}
        self.nodes = 0

    def line_of(self, mark: Any) -> int:
        index = min(max(getattr(mark, "index", 0) or 0, 0), len(self.text))
        return self.text.count("\n", 0, index) + 1

    def fail(self, line: int, message: str) -> ConfigError:
        return ConfigError(self.file, line, _one_line(message))

    def scalar(self, node: yaml.ScalarNode, line: int) -> Any:
        try:
            return self.construct_object(node, deep=True)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # e.g. timestamp 2020-02-30: ValueError; !!int abc
            raise self.fail(line, f"invalid value {_q(node.value)}: {exc}") from None

    def build(self, node: yaml.Node, path: tuple[Any, ...], key_line: int, depth: int) -> Any:
        value_line = self.line_of(node.start_mark)
        if isinstance(node, yaml.ScalarNode) and node.style in ("|", ">") and node.value:
            value_line = min(value_line + 1, self.line_of(node.end_mark))  # content, not the indicator
        self.lines[path] = (key_line, value_line)
        self.nodes += 1
        if depth > _MAX_DEPTH:
            raise self.fail(value_line, f"nesting deeper than {_MAX_DEPTH} levels (recursive alias?)")
        if self.nodes > _MAX_NODES:
            raise self.fail(value_line, f"document too large: more than {_MAX_NODES} values (alias bomb?)")

        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, value_line)

        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                raise self.fail(value_line, f"unsupported YAML tag {_q(node.tag)}")
            return [
                self.build(child, path + (i,), self.line_of(child.start_mark), depth + 1)
                for i, child in enumerate(node.value)
            ]

        if isinstance(node, yaml.MappingNode):
            if node.tag != "tag:yaml.org,2002:map":
                raise self.fail(value_line, f"unsupported YAML tag {_q(node.tag)}")
            result: dict[str, Any] = {}
            merges = [v for k, v in node.value if k.tag == "tag:yaml.org,2002:merge"]
            for merge in merges:  # merged keys first; explicit keys override them
                sources = merge.value if isinstance(merge, yaml.SequenceNode) else [merge]
                for source in sources:
                    if not isinstance(source, yaml.MappingNode):
                        raise self.fail(self.line_of(source.start_mark), "a merge key (<<) needs a mapping or a list of mappings")
                    merged = self.build(source, path, key_line, depth + 1)
                    for k, v in merged.items():
                        result.setdefault(k, v)
            self.lines[path] = (key_line, value_line)
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                line = self.line_of(key_node.start_mark)
                if not isinstance(key_node, yaml.ScalarNode):
                    raise self.fail(line, "mapping keys must be plain strings, not lists or mappings")
                key = self.scalar(key_node, line)
                if not isinstance(key, str):
                    raise self.fail(line, f"key {_q(key_node.value)} must be a string (it reads as {_describe(key)}; quote it)")
                if key in seen:
                    where = _fmt_path(path) or "the top level"
                    raise self.fail(line, f"duplicate key {_q(key)} in {where} (first on line {seen[key]})")
                seen[key] = line
                result[key] = self.build(value_node, path + (key,), line, depth + 1)
            return result

        raise self.fail(value_line, f"unsupported YAML node {type(node).__name__}")  # pragma: no cover


def _read_text(file: str) -> str:
    # Never blocks: a FIFO (or a device) is refused, not opened; symlinks are followed, as
    # Kubernetes mounts a ConfigMap's files through them.
    try:
        data = targetfile.read_head(file, MAX_FILE_BYTES + 1, follow_symlinks=True)
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise ConfigError(file, 0, _one_line(f"cannot read config: {reason}")) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(file, 0, f"cannot read config: larger than {MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start : exc.start + 1].hex()
        raise ConfigError(file, line, f"not valid UTF-8: {exc.reason} (byte 0x{bad})") from None


def _yaml_error(file: str, text: str, exc: yaml.YAMLError) -> ConfigError:
    def line_at(index: int) -> int:
        index = min(max(index, 0), len(text))
        return text.count("\n", 0, index) + 1

    if isinstance(exc, yaml.reader.ReaderError):
        line = line_at(exc.position)
        if isinstance(exc.character, int):
            what = f"character U+{exc.character:04X} is not allowed in YAML"
        else:
            what = exc.reason
        return ConfigError(file, line, _one_line(f"YAML error: {what}"))
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = line_at(mark.index) if mark is not None else 1
        problem = exc.problem or exc.context or "invalid YAML"
        parts = []
        if exc.context and exc.problem:
            parts.append(exc.context)
        parts.append(problem)
        syntax = isinstance(exc, (yaml.scanner.ScannerError, yaml.parser.ParserError))
        message = ("YAML syntax error: " if syntax else "YAML error: ") + ": ".join(parts)
        if "'\\t'" in problem:
            message += " (YAML does not allow tabs for indentation; use spaces)"
        return ConfigError(file, line, _one_line(message))
    return ConfigError(file, 1, _one_line(f"YAML error: {exc}"))


def _parse(file: str, text: str) -> tuple[Any, dict[tuple[Any, ...], tuple[int, int]], int]:
    """Return (data, lines, root_line)."""
    loader = None
    try:
        loader = _LineLoader(text, file)
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(file, 1, 'empty configuration: expected a mapping with a "targets" list')
        root_line = loader.line_of(node.start_mark)
        data = loader.build(node, (), root_line, 0)
        return data, loader.lines, root_line
    except yaml.YAMLError as exc:
        raise _yaml_error(file, text, exc) from None
    except RecursionError:
        index = getattr(loader, "index", 0) if loader is not None else 0
        line = text.count("\n", 0, min(index, len(text))) + 1
        raise ConfigError(file, line, "YAML nested too deeply") from None
    finally:
        if loader is not None:
            try:
                loader.dispose()
            except Exception:  # pragma: no cover
                pass


# --------------------------------------------------------------------------------------------
# Schema validation


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return json.load(fh)


@lru_cache(maxsize=1)
def _validator() -> Any:
    from jsonschema import Draft7Validator

    return Draft7Validator(_schema())


def _known_key_homes() -> dict[str, str]:
    """key name -> where it belongs (for 'belongs under ...' hints)."""
    schema = _schema()
    homes: dict[str, str] = {}
    for key in schema["properties"]:
        homes.setdefault(key, "the top level")
    for section in ("sampling", "limits"):
        for key in schema["properties"][section]["properties"]:
            homes.setdefault(key, f'"{section}"')
    for key in schema["definitions"]["target"]["properties"]:
        homes.setdefault(key, "a target (an item of \"targets\")")
    for key in schema["definitions"]["match"]["properties"]:
        homes.setdefault(key, 'a target\'s "match"')
    return homes


class _Locator:
    def __init__(self, lines: dict[tuple[Any, ...], tuple[int, int]], root_line: int):
        self.lines = lines
        self.root_line = root_line

    def key(self, path: tuple[Any, ...]) -> int:
        """Line of the key holding path (item line for list items, first line for the root)."""
        if not path:
            return self.root_line
        return self.lines.get(tuple(path), (self.root_line, self.root_line))[0]

    def value(self, path: tuple[Any, ...], value: Any) -> int:
        """Line of a scalar value; the key line for null and for containers."""
        key_line, value_line = self.lines.get(tuple(path), (self.root_line, self.root_line))
        if value is None or isinstance(value, (dict, list)):
            return key_line
        return value_line


def _schema_errors(data: Any, loc: _Locator) -> Iterator[tuple[int, int, str]]:
    """Yield (line, rank, message) for every schema violation."""
    homes = _known_key_homes()
    for err in _validator().iter_errors(data):
        path = tuple(err.absolute_path)
        kind = err.validator
        if kind == "additionalProperties" and isinstance(err.instance, dict):
            yield from _unknown_keys(err, path, loc, homes)
        elif kind == "required" and isinstance(err.instance, dict):
            yield from _missing_keys(err, path, loc)
        elif kind == "type":
            yield loc.value(path, err.instance), 2, _wrong_type(err, path)
        else:
            yield loc.value(path, err.instance), 3, _bad_value(err, path)


def _in(path: tuple[Any, ...]) -> str:
    """Where a key is missing or unknown, as the messages say it."""
    return f"in {_fmt_path(path)}" if path else "at the top level"


def _unknown_keys(err, path: tuple[Any, ...], loc: _Locator,
                  homes: dict[str, str]) -> Iterator[tuple[int, int, str]]:
    """One error per key the schema does not know, with the key meant or where it belongs."""
    allowed = list(err.schema.get("properties", {}))
    for key in err.instance:
        if key in allowed:
            continue
        msg = f"unknown key {_q(key)} {_in(path)}"
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        if close:
            msg += f' (did you mean "{close[0]}"?)'
        elif key in homes:
            msg += f" ({key} belongs in {homes[key]})"
        else:
            msg += " (allowed: " + ", ".join(allowed) + ")"
        yield loc.key(path + (key,)), 0, msg


def _missing_keys(err, path: tuple[Any, ...], loc: _Locator) -> Iterator[tuple[int, int, str]]:
    """One error per required key that is absent; an else branch's requirement ranks last."""
    rank = 9 if "else" in err.schema_path else 1
    for key in err.validator_value:
        if key in err.instance:
            continue
        msg = f'missing required key "{key}" {_in(path)}'
        if key == "match":
            msg += " (or set python_only: true to select every CPython process)"
        yield loc.key(path), rank, msg


def _wrong_type(err, path: tuple[Any, ...]) -> str:
    inst = err.instance
    types = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
    if not path:
        return f'the top level must be a mapping with a "targets" list, not {_describe(inst)}'
    expected = " or ".join(_TYPE_WORDS.get(t, t) for t in types)
    msg = f"{_fmt_path(path)}: expected {expected}, got {_describe(inst)}"
    if "string" in types and inst is not None and not isinstance(inst, (str, dict, list)):
        msg += " (quote it)"
    return msg


def _bad_value(err, path: tuple[Any, ...]) -> str:
    """A value of the right type out of its bounds (size, length, pattern, range)."""
    name = _fmt_path(path)
    kind, bound, inst = err.validator, err.validator_value, err.instance
    last = path[-1] if path else None
    if kind == "minItems":
        if path == ("targets",):
            return "targets: the list is empty; give at least one target"
        return f"{name}: needs at least {bound} item(s)"
    if kind == "minProperties":
        if last == "match":
            return f"{name}: no matchers given; use at least one of " + ", ".join(MATCHER_KEYS)
        return f"{name}: must not be empty"
    if kind == "minLength":
        return f"{name}: must not be empty"
    if kind == "maxLength":
        msg = f"{name}: longer than {bound} characters"
        if last == "comm":
            msg += " (the kernel truncates /proc/PID/comm to 15 characters)"
        return msg
    if kind == "pattern":
        if last == "pidfile":
            return f"{name}: must be an absolute path, got {_q(inst)}"
        if last == "name":
            return f"{name}: must not contain control characters"
        return f"{name}: {_q(inst)} does not match {_q(bound)}"
    if kind in _RANGE_WORDS:
        return f"{name}: must be {_RANGE_WORDS[kind]} {_num(bound)}, got {_num(inst)}"
    return f"{name or 'configuration'}: {err.message}"


_RANGE_WORDS = {"minimum": "at least", "exclusiveMinimum": "greater than",
                "maximum": "at most", "exclusiveMaximum": "less than"}


# --------------------------------------------------------------------------------------------
# Semantic checks and building the Config


def _semantic_errors(data: dict[str, Any], loc: _Locator) -> Iterator[tuple[int, int, str]]:
    # non-finite numbers pass the schema's range checks (nan compares false)
    numeric = [("scan_interval_seconds",), ("window_seconds",), ("sampling", "rate_hz")]
    for path in numeric:
        node: Any = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, float) and not math.isfinite(node):
            yield loc.value(path, node), 3, f"{_fmt_path(path)}: must be a finite number, got {node!r}"

    scan = data.get("scan_interval_seconds", 5.0)
    window = data.get("window_seconds", 10.0)
    if (
        isinstance(scan, (int, float))
        and isinstance(window, (int, float))
        and math.isfinite(scan)
        and math.isfinite(window)
        and scan > window
    ):
        if "window_seconds" in data:
            line = loc.value(("window_seconds",), window)
            msg = f"window_seconds ({_num(window)}) must be at least scan_interval_seconds ({_num(scan)})"
        else:
            line = loc.value(("scan_interval_seconds",), scan)
            msg = f"scan_interval_seconds ({_num(scan)}) must not exceed window_seconds (default {_num(window)})"
        yield line, 3, msg

    names: dict[str, int] = {}
    for i, target in enumerate(data.get("targets") or []):
        name = target.get("name")
        name_line = loc.value(("targets", i, "name"), name)
        if isinstance(name, str):
            if name in names:
                yield name_line, 3, f"duplicate target name {_q(name)} (first used on line {names[name]})"
            else:
                names[name] = name_line
        match = target.get("match") or {}
        for key in _REGEX_KEYS:
            pattern = match.get(key)
            if not isinstance(pattern, str):
                continue
            path = ("targets", i, "match", key)
            try:
                re.compile(pattern)
            except re.error as exc:
                where = f" at position {exc.pos}" if exc.pos is not None else ""
                yield loc.value(path, pattern), 3, f"{_fmt_path(path)}: invalid regular expression: {exc.msg}{where}"
            except Exception as exc:  # OverflowError, RecursionError, ...
                yield loc.value(path, pattern), 3, f"{_fmt_path(path)}: invalid regular expression: {exc}"
        if "pid" in match and "pidfile" in match:
            base = ("targets", i, "match")
            line = max(loc.key(base + ("pid",)), loc.key(base + ("pidfile",)))
            yield line, 3, f"{_fmt_path(base)}: pid and pidfile are mutually exclusive; give one"


def _build(data: dict[str, Any], source: str) -> Config:
    targets = []
    for target in data["targets"]:
        m = target.get("match") or {}
        user = m.get("user")
        match = Match(
            cmdline=re.compile(m["cmdline"]) if "cmdline" in m else None,
            comm=m.get("comm"),
            exe=re.compile(m["exe"]) if "exe" in m else None,
            pid=m.get("pid"),
            pidfile=m.get("pidfile"),
            user=None if user is None else str(user),
            cgroup=re.compile(m["cgroup"]) if "cgroup" in m else None,
            python=bool(target.get("python_only", False)),
        )
        targets.append(Target(name=target["name"], match=match))
    sampling = data.get("sampling") or {}
    limits = data.get("limits") or {}
    return Config(
        targets=tuple(targets),
        scan_interval_seconds=float(data.get("scan_interval_seconds", 5.0)),
        window_seconds=float(data.get("window_seconds", 10.0)),
        sampling=Sampling(
            rate_hz=float(sampling.get("rate_hz", 100.0)),
            enabled=bool(sampling.get("enabled", True)),
            per_thread=bool(sampling.get("per_thread", Sampling.per_thread)),
        ),
        limits=Limits(
            max_targets=int(limits.get("max_targets", Limits.max_targets)),
            max_processes_per_target=int(limits.get("max_processes_per_target", Limits.max_processes_per_target)),
            max_threads_per_process=int(limits.get("max_threads_per_process", Limits.max_threads_per_process)),
        ),
        source=source,
    )


def _first(errors: list[tuple[int, int, str]]) -> tuple[int, int, str] | None:
    if not errors:
        return None
    return min(errors, key=lambda e: (e[1] == 9, e[0], e[1]))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Load and validate a configuration file; raise ConfigError for anything wrong."""
    file = os.fspath(path)
    if isinstance(file, bytes):  # pragma: no cover - bytes paths
        file = os.fsdecode(file)
    text = _read_text(file)
    try:
        data, lines, root_line = _parse(file, text)
        loc = _Locator(lines, root_line)
        first = _first(list(_schema_errors(data, loc)))
        if first is None:
            first = _first(list(_semantic_errors(data, loc)))
        if first is not None:
            line, _rank, message = first
            raise ConfigError(file, line, _one_line(message))
        return _build(data, file)
    except ConfigError:
        raise
    except (OSError, ImportError):
        raise  # broken installation (schema file or jsonschema missing), not a config problem
    except Exception as exc:  # safety net: the contract is "ConfigError for everything wrong"
        raise ConfigError(file, 1, _one_line(f"invalid configuration: {exc.__class__.__name__}: {exc}")) from None
