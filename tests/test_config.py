"""Tests for exporter.config: the bad-config catalogue, examples, schema, properties."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter import config as cfg
from exporter.config import (
    Config,
    ConfigError,
    Limits,
    Match,
    Sampling,
    Target,
    default_config,
    load_config,
)

ROOT = Path(__file__).resolve().parent.parent
BAD = Path(__file__).resolve().parent / "bad_configs"
EXAMPLES = sorted((ROOT / "config").glob("*.yaml"))
SCHEMA_LINE = "# yaml-language-server: $schema=./gil-exporter.schema.json"

# Every catalogue file starts with "# expect: LINE: message fragment".
_EXPECT = re.compile(rb"^# expect: (\d+): (.+?)\r?\n")


def _catalogue():
    out = []
    for path in sorted(BAD.glob("*.yaml")):
        m = _EXPECT.match(path.read_bytes())
        assert m, f"{path.name}: first line must be '# expect: LINE: fragment'"
        out.append(pytest.param(path, int(m.group(1)), m.group(2).decode(), id=path.stem))
    return out


CATALOGUE = _catalogue()


def _assert_one_line(err: ConfigError, file: str, line: int):
    text = str(err)
    assert text == f"{file}:{line}: {err.message}"
    assert text.startswith(f"{file}:")
    assert len(text.splitlines()) == 1
    assert err.file == file and err.line == line


# ---------------------------------------------------------------------------------------------
# Bad configurations: exact line and message fragment


def test_catalogue_is_big_enough():
    assert len(CATALOGUE) >= 20


@pytest.mark.parametrize("path,line,fragment", CATALOGUE)
def test_bad_config(path: Path, line: int, fragment: str):
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    err = info.value
    assert err.line == line, str(err)
    assert fragment in err.message, str(err)
    _assert_one_line(err, str(path), line)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    _assert_one_line(info.value, path, 0)
    assert "No such file" in info.value.message


def test_directory(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    _assert_one_line(info.value, str(tmp_path), 0)
    assert "directory" in info.value.message


def test_permission_denied_chmod(tmp_path):
    path = tmp_path / "secret.yaml"
    path.write_text("targets: []\n")
    path.chmod(0)
    try:
        open(path, "rb").close()
    except PermissionError:
        pass
    else:
        pytest.skip("running with CAP_DAC_OVERRIDE (root): chmod 000 does not deny reading")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    _assert_one_line(info.value, str(path), 0)
    assert "Permission denied" in info.value.message


def test_permission_denied_even_for_root():
    # sysctl files honour their mode bits even for root; compact_memory is write-only (0200)
    path = "/proc/sys/vm/compact_memory"
    try:
        open(path, "rb").close()
    except PermissionError:
        pass
    except OSError:
        pytest.skip(f"{path} not available")
    else:
        pytest.skip(f"{path} readable here")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    _assert_one_line(info.value, path, 0)
    assert "Permission denied" in info.value.message


def test_read_error_is_line_zero():
    # /proc/self/mem opens fine but reading at offset 0 fails with EIO
    path = "/proc/self/mem"
    if not os.path.exists(path):
        pytest.skip("no /proc")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    _assert_one_line(info.value, path, 0)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    _assert_one_line(info.value, str(path), 1)
    assert "empty configuration" in info.value.message


def test_too_large(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"# x\n" * (cfg.MAX_FILE_BYTES // 4 + 1))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    _assert_one_line(info.value, str(path), 0)


def test_deep_nesting_is_a_config_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("targets:\n" + "[" * 5000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert 1 <= info.value.line <= 2


def test_alias_bomb(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    lines.append("targets: [*a7]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert 1 <= info.value.line <= len(lines)
    assert "too large" in info.value.message


def test_crlf_line_numbers(tmp_path):
    path = tmp_path / "crlf.yaml"
    path.write_bytes(b"targets:\r\n  - name: api\r\n    match:\r\n      comand: x\r\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.line == 4


def test_did_you_mean_listing_when_no_close_match(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("targets:\n  - name: a\n    match:\n      zzzzzz: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.line == 4
    assert "allowed: cmdline, comm, exe, pid, pidfile, user, cgroup" in info.value.message


def test_config_error_str():
    err = ConfigError("x.yaml", 7, 'unknown key "comand"')
    assert str(err) == 'x.yaml:7: unknown key "comand"'
    assert isinstance(err, Exception)


# ---------------------------------------------------------------------------------------------
# Valid configurations


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_load(path: Path):
    config = load_config(str(path))
    assert isinstance(config, Config)
    assert config.source == str(path)
    assert config.targets


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_reference_schema(path: Path):
    assert path.read_text().splitlines()[0] == SCHEMA_LINE


def test_examples_present():
    names = {p.name for p in EXAMPLES}
    assert {"example.yaml", "all-python.yaml"} <= names


def test_example_content():
    config = load_config(str(ROOT / "config" / "example.yaml"))
    api = config.targets[0]
    assert api.name == "checkout-api"
    assert api.match.cmdline.search("gunicorn app:checkout --workers 4")
    assert api.match.user == "www-data"
    assert api.match.python is False
    assert config.targets[1].match.python is True
    assert config.sampling == Sampling(rate_hz=100.0, enabled=True)
    assert config.limits == Limits(max_targets=100, max_processes_per_target=50)
    assert config.scan_interval_seconds == 5.0 and config.window_seconds == 10.0


def test_all_python_equals_default():
    config = load_config(str(ROOT / "config" / "all-python.yaml"))
    assert config.targets == default_config().targets


def test_example_uses_every_schema_key():
    text = (ROOT / "config" / "example.yaml").read_text()
    schema = json.loads(cfg.SCHEMA_PATH.read_text())
    keys = set(schema["properties"])
    keys |= set(schema["properties"]["sampling"]["properties"])
    keys |= set(schema["properties"]["limits"]["properties"])
    keys |= set(schema["definitions"]["target"]["properties"])
    keys |= set(schema["definitions"]["match"]["properties"]) - {"pid"}  # pid excludes pidfile
    for key in keys:
        assert re.search(rf"^\s*(- )?{key}:", text, re.M), key


def test_default_config():
    config = default_config()
    assert config.source is None
    assert config.targets == (Target(name="python", match=Match(python=True)),)
    assert config.scan_interval_seconds == 5.0
    assert config.window_seconds == 10.0
    assert config.sampling == Sampling()
    assert config.limits == Limits()


def test_minimal_and_defaults(tmp_path):
    path = tmp_path / "min.yaml"
    path.write_text("targets:\n  - name: api\n    match: {comm: python3}\n")
    config = load_config(path)  # os.PathLike accepted too
    assert config.source == str(path)
    assert config.targets == (Target("api", Match(comm="python3")),)
    assert config.sampling == Sampling() and config.limits == Limits()
    with pytest.raises(Exception):
        config.window_seconds = 3  # frozen


def test_all_matchers_and_types(tmp_path):
    path = tmp_path / "all.yaml"
    path.write_text(
        "targets:\n"
        "  - name: a\n"
        "    python_only: false\n"
        "    match:\n"
        "      cmdline: 'gunicorn .*checkout'\n"
        "      comm: python3\n"
        "      exe: '.*/python3\\.1[0-9]$'\n"
        "      pid: 1234\n"
        "      user: 1000\n"
        "      cgroup: 'kubepods.*'\n"
        "  - name: b\n"
        "    match: {pidfile: /run/app.pid, user: www-data}\n"
        "scan_interval_seconds: 2\n"
        "window_seconds: 2\n"
        "sampling: {rate_hz: 250, enabled: false, per_thread: true}\n"
        "limits: {max_targets: 7, max_processes_per_target: 3, max_threads_per_process: 0}\n"
    )
    config = load_config(str(path))
    m = config.targets[0].match
    assert isinstance(m.cmdline, re.Pattern) and m.cmdline.pattern == "gunicorn .*checkout"
    assert m.exe.search("/usr/bin/python3.12") and not m.exe.search("/usr/bin/python3.9")
    assert m.cgroup.search("0::/kubepods.slice/x")
    assert (m.comm, m.pid, m.user, m.pidfile, m.python) == ("python3", 1234, "1000", None, False)
    assert config.targets[1].match == Match(pidfile="/run/app.pid", user="www-data")
    assert config.scan_interval_seconds == 2.0 and isinstance(config.scan_interval_seconds, float)
    assert config.sampling == Sampling(rate_hz=250.0, enabled=False, per_thread=True)
    assert config.limits == Limits(max_targets=7, max_processes_per_target=3, max_threads_per_process=0)


def test_anchors_and_merge_keys(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        "base: &base {comm: python3, user: app}\n"
        "targets:\n"
        "  - name: a\n"
        "    match:\n"
        "      <<: *base\n"
        "      user: other\n"
    )
    # "base" is not a known top-level key: anchors must live inside the targets
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.line == 1 and 'unknown key "base"' in info.value.message
    path.write_text(
        "targets:\n"
        "  - name: a\n"
        "    match: &m {comm: python3, user: app}\n"
        "  - name: b\n"
        "    match:\n"
        "      <<: *m\n"
        "      user: other\n"
        "      comand: x\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.line == 8
    path.write_text(path.read_text().replace("      comand: x\n", ""))
    config = load_config(str(path))
    assert config.targets[1].match == Match(comm="python3", user="other")


def test_utf8_bom_and_unicode_names(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufefftargets:\n  - name: café\n    match: {comm: python3}\n".encode())
    assert load_config(str(path)).targets[0].name == "café"


# ---------------------------------------------------------------------------------------------
# Schema


def _walk_schema(node, path="#"):
    if isinstance(node, dict):
        for key, sub in node.get("properties", {}).items():
            yield f"{path}/properties/{key}", sub
            yield from _walk_schema(sub, f"{path}/properties/{key}")
        for key, sub in node.get("definitions", {}).items():
            yield f"{path}/definitions/{key}", sub
            yield from _walk_schema(sub, f"{path}/definitions/{key}")


def test_schema_is_valid_and_described():
    from jsonschema import Draft7Validator

    schema = json.loads(cfg.SCHEMA_PATH.read_text())
    Draft7Validator.check_schema(schema)
    assert schema.get("description")
    for where, sub in _walk_schema(schema):
        if "$ref" in sub:
            continue
        assert sub.get("description"), f"{where} has no description"


def test_schema_contract_keys():
    schema = json.loads(cfg.SCHEMA_PATH.read_text())
    assert {"targets", "scan_interval_seconds", "window_seconds", "sampling", "limits"} <= set(schema["properties"])
    assert set(cfg.MATCHER_KEYS) == set(schema["definitions"]["match"]["properties"])
    assert {"name", "match", "python_only"} == set(schema["definitions"]["target"]["properties"])
    assert {"rate_hz", "enabled", "per_thread"} == set(schema["properties"]["sampling"]["properties"])
    assert {"max_targets", "max_processes_per_target", "max_threads_per_process"} == set(
        schema["properties"]["limits"]["properties"])


def test_schema_defaults_match_dataclasses():
    schema = json.loads(cfg.SCHEMA_PATH.read_text())
    props = schema["properties"]
    assert props["scan_interval_seconds"]["default"] == Config.__dataclass_fields__["scan_interval_seconds"].default
    assert props["window_seconds"]["default"] == Config.__dataclass_fields__["window_seconds"].default
    assert props["sampling"]["properties"]["rate_hz"]["default"] == Sampling().rate_hz
    assert props["sampling"]["properties"]["enabled"]["default"] == Sampling().enabled
    assert props["limits"]["properties"]["max_targets"]["default"] == Limits().max_targets
    lim = props["limits"]["properties"]["max_processes_per_target"]["default"]
    assert lim == Limits().max_processes_per_target
    assert props["sampling"]["properties"]["per_thread"]["default"] is Sampling().per_thread is False
    assert props["limits"]["properties"]["max_threads_per_process"]["default"] == Limits().max_threads_per_process


def test_schema_symlink_in_config_dir():
    link = ROOT / "config" / "gil-exporter.schema.json"
    assert link.is_symlink()
    target = os.readlink(link)
    assert not os.path.isabs(target)
    assert link.resolve() == cfg.SCHEMA_PATH.resolve()
    assert cfg.SCHEMA_PATH.parent.name == "schema" and cfg.SCHEMA_PATH.parent.parent.name == "exporter"


# ---------------------------------------------------------------------------------------------
# Properties: load_config returns a Config or raises ConfigError with a line inside the document

_FAST = settings(
    max_examples=int(os.environ.get("CONFIG_PROPERTY_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("prop") / "c.yaml"


def _check(path: Path, data: bytes):
    path.write_bytes(data)
    try:
        result = load_config(str(path))
    except ConfigError as err:
        text = str(err)
        assert text.startswith(f"{path}:")
        assert len(text.splitlines()) == 1, repr(text)
        assert "\n" not in text and "\r" not in text
        n_lines = data.count(b"\n") + 1
        assert 1 <= err.line <= n_lines, (text, n_lines)
        return None
    assert isinstance(result, Config)
    assert result.targets and all(isinstance(t, Target) for t in result.targets)
    return result


@_FAST
@given(st.text(max_size=300))
def test_property_arbitrary_text(scratch, text):
    _check(scratch, text.encode("utf-8", "surrogatepass"))


@_FAST
@given(st.binary(max_size=200))
def test_property_arbitrary_bytes(scratch, data):
    _check(scratch, data)


_TOKENS = [
    "targets", "name", "match", "cmdline", "comm", "exe", "pid", "pidfile", "user", "cgroup",
    "python_only", "sampling", "rate_hz", "enabled", "per_thread", "limits", "max_targets",
    "max_processes_per_target", "max_threads_per_process", "scan_interval_seconds", "window_seconds",
    ":", ": ", "- ", "\n", "\n  ", "\n    ", "\n      ", "\t", " ", "#", "'", '"', "[", "]",
    "{", "}", ",", "&a ", "*a", "<<: ", "!!str ", "!!int ", "!!python/tuple ", "---", "...",
    "|", ">-", "?", "%YAML 1.1\n", "0", "-1", "1.5", ".nan", ".inf", "true", "null", "~",
    "2024-02-30", "0x1F", "(", "*", "\\", "\r\n", "\u2028", "\x85", "é", "\x00",
]


@_FAST
@given(st.lists(st.sampled_from(_TOKENS), max_size=60))
def test_property_yamlish(scratch, tokens):
    _check(scratch, "".join(tokens).encode("utf-8", "surrogatepass"))


_VALID = (ROOT / "config" / "example.yaml").read_text()


@st.composite
def _mutated(draw):
    text = _VALID
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "replace_line", "dup_line", "swap", "indent"]))
        lines = text.split("\n")
        if kind == "delete" and text:
            i = draw(st.integers(0, len(text) - 1))
            j = draw(st.integers(i, min(len(text), i + 40)))
            text = text[:i] + text[j:]
        elif kind == "insert":
            i = draw(st.integers(0, len(text)))
            text = text[:i] + draw(st.sampled_from(_TOKENS) | st.text(max_size=5)) + text[i:]
        elif kind == "replace_line":
            i = draw(st.integers(0, len(lines) - 1))
            lines[i] = draw(st.sampled_from(_TOKENS) | st.text(max_size=20))
            text = "\n".join(lines)
        elif kind == "dup_line":
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            text = "\n".join(lines)
        elif kind == "swap":
            i = draw(st.integers(0, len(lines) - 1))
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        else:
            i = draw(st.integers(0, len(lines) - 1))
            lines[i] = draw(st.sampled_from(["", " ", "  ", "\t"])) + lines[i].lstrip(" ")
            text = "\n".join(lines)
    return text


@_FAST
@given(_mutated())
def test_property_mutated_example(scratch, text):
    _check(scratch, text.encode("utf-8", "surrogatepass"))


_KEYS = st.sampled_from(_TOKENS[:19]) | st.text(max_size=6)
_SCALARS = (
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.sampled_from(["(", "python3", "/run/x.pid", "gunicorn .*"])
)
_DOCS = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5), max_leaves=25)


@_FAST
@given(_DOCS, st.booleans())
def test_property_structured(scratch, doc, flow):
    text = yaml.safe_dump(doc, default_flow_style=flow, allow_unicode=True)
    _check(scratch, text.encode("utf-8", "surrogatepass"))


_MATCH = st.fixed_dictionaries(
    {},
    optional={
        "cmdline": st.sampled_from(["gunicorn", "(", "a{2,1}", "x"]) | st.text(max_size=5),
        "comm": st.text(max_size=18),
        "pid": st.integers(-2, 5_000_000) | st.text(max_size=3),
        "pidfile": st.sampled_from(["/run/a.pid", "a.pid", ""]),
        "user": st.integers(-1, 70000) | st.text(max_size=5),
        "cgroup": st.text(max_size=5),
    },
)
_TARGET = st.fixed_dictionaries(
    {"name": st.sampled_from(["a", "b", "", 3])},
    optional={"match": _MATCH, "python_only": st.booleans() | st.none()},
)
_CONFIGS = st.fixed_dictionaries(
    {"targets": st.lists(_TARGET, max_size=3)},
    optional={
        "scan_interval_seconds": st.floats(-1, 100) | st.integers(-1, 100),
        "window_seconds": st.floats(-1, 100) | st.just(float("nan")) | st.integers(0, 100),
        "sampling": st.fixed_dictionaries({}, optional={"rate_hz": st.floats(-1, 2000), "enabled": st.booleans(),
                                                        "per_thread": st.booleans() | st.integers(0, 1)}),
        "limits": st.fixed_dictionaries({}, optional={"max_targets": st.integers(-1, 5), "max_processes_per_target": st.integers(-1, 5),
                                                      "max_threads_per_process": st.integers(-1, 1001)}),
    },
)


@_FAST
@given(_CONFIGS)
def test_property_near_valid(scratch, doc):
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    result = _check(scratch, text.encode())
    if result is not None:  # accepted => the values really are sane
        assert result.scan_interval_seconds <= result.window_seconds
        assert 0 < result.sampling.rate_hz <= 1000
        assert isinstance(result.sampling.per_thread, bool)
        assert 0 <= result.limits.max_threads_per_process <= 1000
        names = [t.name for t in result.targets]
        assert len(names) == len(set(names))
        for t in result.targets:
            assert t.match != Match() or t.match.python
            assert not (t.match.pid is not None and t.match.pidfile is not None)
