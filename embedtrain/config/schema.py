"""The strict machinery every recipe kind and merge documents share.

Plain data (a YAML mapping) becomes a tree of dataclasses; every problem (unknown key with a
did-you-mean suggestion, wrong type with its dotted path, bad value) is collected, and
:func:`build_checked` raises one :class:`ConfigError` listing them all. Also: dotted overrides,
YAML reading, ``pkg://`` paths. No torch, no other embedtrain subpackage.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional, TypeVar, Union

import yaml

from embedtrain.errors import ConfigError, EmbedtrainError, did_you_mean

PACKAGE_SCHEME = "pkg://"
#: file suffix -> the ``datasets`` builder that reads it (``.tar``: webdataset shards)
DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".tar": "webdataset"}
DATA_SUFFIXES = tuple(DATA_FORMATS)
_SUFFIX_LIST = ", ".join(DATA_SUFFIXES)
T = TypeVar("T")


# --------------------------------------------------------------------------------------
# Generic strict conversion from plain data to dataclasses
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return f"{type(value).__name__} {value!r}"


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Convert ``value`` to ``tp``, appending '<path>: ...' problems instead of raising."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {_describe(value)}")
            return tp()
        return _build_dataclass(tp, value, path, problems)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            problems.append(f"{path}: expected {_type_name(tp)}, got null")
            return None
        non_none = [a for a in args if a is not type(None)]
        trial: list[str] = []
        return _convert(value, non_none[0], path, problems if len(non_none) == 1 else trial)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value is False and "no" in allowed:  # YAML 1.1 reads an unquoted `no` as false
            value = "no"
        if value not in allowed:
            problems.append(
                f"{path}: {value!r} is not allowed{did_you_mean(str(value), [str(a) for a in allowed])}; "
                f"choose one of: {', '.join(map(str, allowed))}"
            )
            return allowed[0]
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_describe(value)}")
            return []
        return [_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {_describe(value)}")
            return False
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {_describe(value)}")
            return 0
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-5 (no dot) as a string; accept it as the number it clearly is
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {_describe(value)}")
            return 0.0
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {_describe(value)}")
            return ""
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in this module


def _build_dataclass(cls: type, data: dict, path: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            problems.append(
                f"{dotted}: unknown key{did_you_mean(str(key), names)}; "
                f"{'allowed' if path else 'sections'}: {', '.join(names)}"
            )
            continue
        kwargs[key] = _convert(value, hints[key], dotted, problems)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain data (for YAML/JSON)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of ``cls`` and of the dataclasses it extends, or the field's
    ``doc`` metadata (for `embedtrain info` and docs); a subclass's docstring wins over its base's."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        docs.update({f.name: f.metadata["doc"] for f in dataclasses.fields(klass) if "doc" in f.metadata})
        try:
            source = inspect.getsource(klass)
        except OSError:  # made by dataclasses.make_dataclass: no source, the docs are in the metadata
            continue
        tree = ast.parse(source)
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = str(nxt.value.value)  # type: ignore[union-attr]
    return docs


def build_checked(cls: type[T], data: dict, check: Optional[Callable[[T, list[str]], None]] = None) -> T:
    """Build ``cls`` from plain data, run ``check(obj, problems)``, raise one ConfigError with every problem.

    Value problems of fields that converted cleanly are reported even when others did not convert;
    a field that failed to convert holds a placeholder, so its value problems are not reported twice.
    """
    problems: list[str] = []
    obj = _build_dataclass(cls, data, "", problems)
    if check is not None:
        extra: list[str] = []
        check(obj, extra)
        bad_paths = {p.split(":")[0].split("[")[0] for p in problems}
        problems += [p for p in extra if p.split(":")[0].split("[")[0] not in bad_paths]
    if problems:
        raise ConfigError(problems)
    return obj


# --------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------


def apply_override(data: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to nested plain data in place.

    List items are addressed by index: ``data.train.0.max_rows=100``.
    """
    if "=" not in assignment:
        raise ConfigError([f"override '{assignment}': expected key=value, e.g. train.lr=1e-5"])
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError([f"override '{key}': {'.'.join(parts[: i + 1])} is not an index of the list"])
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError([f"override '{key}': {'.'.join(parts[: i + 1])} is not a section"])
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError([f"override '{key}': {last} is not an index of the list"])
        node[int(last)] = value
    else:
        node[last] = value


# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------


def resolve_path(path: str) -> str:
    """Expand ``pkg://module/sub/dir`` to a folder inside an installed Python package."""
    if not path.startswith(PACKAGE_SCHEME):
        return os.path.expanduser(path)
    module, _, rest = path[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        raise EmbedtrainError(f"{path}: Python package '{module}' is not installed; pip install it or give a path")
    return str(Path(list(spec.submodule_search_locations)[0]) / rest)


def local_data_files(path: str) -> tuple[str, list[str]]:
    """A local dataset path as (``datasets`` builder, files): one file, a folder of shards (its files of one
    supported format, sorted by name; subfolders are not read) or a glob pattern (``data/train-*.parquet``).
    Raises :class:`EmbedtrainError` naming what is wrong and the fix."""
    import glob

    p = resolve_path(path)
    if any(c in p for c in "*?["):
        files = sorted(f for f in glob.glob(p) if os.path.isfile(f))
        if not files:
            raise EmbedtrainError(f"{p}: no file matches this pattern; check the path")
    elif os.path.isdir(p):
        files = sorted(str(f) for f in Path(p).iterdir() if f.is_file() and f.suffix in DATA_FORMATS)
        if not files:
            raise EmbedtrainError(f"{p}: a folder with no data file ({_SUFFIX_LIST}); check the path")
    elif os.path.isfile(p):
        files = [p]
    else:
        raise EmbedtrainError(f"file {p} does not exist; check the path")
    suffixes = sorted({Path(f).suffix for f in files})
    if any(s not in DATA_FORMATS for s in suffixes):
        bad = next(f for f in files if Path(f).suffix not in DATA_FORMATS)
        raise EmbedtrainError(f"{bad} has an unsupported format; use {_SUFFIX_LIST}")
    builders = {DATA_FORMATS[s] for s in suffixes}
    if len(builders) > 1:
        raise EmbedtrainError(f"{p}: shards of more than one format ({', '.join(suffixes)}); give one format per dataset")
    return builders.pop(), files


def looks_local(path: str) -> bool:
    """True for things that are clearly file-system paths rather than Hub ids."""
    return (
        path.startswith((PACKAGE_SCHEME, "/", "./", "../", "~"))
        or os.path.exists(path)
        or Path(path).suffix in DATA_SUFFIXES
        or any(c in path for c in "*?[")
        or path.count("/") > 1
    )


def check_beir_folder(path: str, where: str, problems: list[str], files: bool = True) -> None:
    """Append a problem unless ``path`` is a BEIR folder (only its presence when ``files`` is False)."""
    if not path:
        problems.append(f"{where}: missing; give a BEIR-layout folder")
        return
    if not files:
        return
    p = resolve_path(path)
    if not os.path.isdir(p):
        problems.append(f"{where}: folder {p} does not exist; check the path")
        return
    for f in ("corpus.jsonl", "queries.jsonl"):
        if not os.path.isfile(os.path.join(p, f)):
            problems.append(f"{where}: {p} has no {f}; a BEIR folder needs corpus.jsonl, queries.jsonl, qrels.tsv")
    if not (os.path.isfile(os.path.join(p, "qrels.tsv")) or os.path.isfile(os.path.join(p, "qrels", "test.tsv"))):
        problems.append(f"{where}: {p} has no qrels.tsv (or qrels/test.tsv)")


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping with one-line errors for missing files and bad syntax."""
    p = Path(path)
    if not p.is_file():
        raise EmbedtrainError(f"{p}: recipe file not found; check the path")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EmbedtrainError(f"{p}: cannot read the recipe ({err.__class__.__name__}); check its permissions and encoding")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise EmbedtrainError(f"{p}: malformed YAML{where}: {problem}; fix the syntax")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EmbedtrainError(f"{p}: a recipe must be a mapping of sections (model, data, ...), got {_describe(data)}")
    return data


def read_overridden(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A YAML document with ``key=value`` overrides applied (see :func:`apply_override`)."""
    data = read_yaml(path)
    for assignment in overrides:
        apply_override(data, assignment)
    return data
