"""Typed, strict configuration: dataclasses + YAML + ``section.key=value`` overrides.

Each component owns a small dataclass config (torchtitan style); an entry point
nests them into one run config and calls::

    cfg = load_config(RunConfig, "configs/vit.yaml", ["optim.lr=3e-3", "model.depths=[2,2]"])

Strict by design: unknown keys, wrong types and missing required fields fail at
start-up with the dotted key, the file and a suggestion -- not hours into a job.
The fully resolved config is saved next to the outputs (``save_resolved_config``)
so every run can be reproduced from its own directory.

Stdlib + pyyaml only: imported by every package, including light CLI tools. The command-line helpers
over it (`--config` + overrides, the `config` subcommand, one-line errors) are in `core.cli`.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from core.fsutil import atomic_write_text

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """Invalid configuration (file, override or value); the message says where and why."""


class InputError(ValueError):
    """One subject's or sequence's input cannot be used (either source); the message names the file and the
    reason. Conversion jobs quarantine it and go on."""


class InputFileError(ValueError):
    """An input file a command cannot use as a whole (a tabular CSV, a manifest); the message names the file and
    the cause. The CLIs print it as one line and exit 2; per-subject inputs are quarantined instead."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (plain YAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if dup is not None:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {dup!r}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


@dataclasses.dataclass
class _CliValue:
    """An override value: parsed by YAML, but the raw text is kept for str/Path fields
    (so ``run.tag=1.10`` stays "1.10" instead of becoming the float 1.1)."""

    parsed: Any
    text: str


class _Ctx:
    """Where values came from, for error messages."""

    def __init__(self, path: Path | None, overrides: dict[str, str]):
        self.path, self.overrides = path, overrides

    def where(self, key: str) -> str:
        for k, text in self.overrides.items():
            if k == key or k.startswith(key + ".") or key.startswith((k + ".", k + "[")):
                return f" (from override {text!r})"
        return f" (in {self.path})" if self.path else ""


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _fail(ctx: _Ctx, key: str, tp: Any, value: Any, extra: str = "") -> typing.NoReturn:
    raise ConfigError(f"{key}: expected {_type_name(tp)}{extra}, got {value!r} "
                      f"({type(value).__name__}){ctx.where(key)}")


def _wants_text(tp: Any) -> bool:
    if tp in (str, Path):
        return True
    options = [a for a in typing.get_args(tp) if a is not type(None)]
    return typing.get_origin(tp) in (Union, types.UnionType) and all(map(_wants_text, options))


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass in ``tp`` (itself or Optional[...]), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    options = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (Union, types.UnionType) and len(options) == 1:
        return _dataclass_in(options[0])
    return None


def _convert(tp: Any, value: Any, key: str, ctx: _Ctx) -> Any:
    if isinstance(value, _CliValue):
        value = value.text if (_wants_text(tp) and value.parsed is not None) else value.parsed
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: report X's own (more precise) error
            return _convert(options[0], value, key, ctx)
        for opt in options:
            try:
                return _convert(opt, value, key, ctx)
            except ConfigError:
                pass
        _fail(ctx, key, tp, value)
    if origin is Literal:
        # type check too: True == 1 and 1 == 1.0 must not match Literal[1] / Literal[True]
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of the allowed values "
                          f"{', '.join(map(repr, args))}{ctx.where(key)}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, key, ctx)
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            _fail(ctx, key, tp, value)
        item = args[0] if args else Any
        return [_item(item, v, key, i, ctx) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(ctx, key, tp, value)
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            _fail(ctx, key, tp, value, f" (exactly {len(args)} items)")
        items = [args[0]] * len(value) if (not args or args[-1] is Ellipsis) else args
        return tuple(_item(t, v, key, i, ctx) for i, (t, v) in enumerate(zip(items, value)))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            _fail(ctx, key, tp, value)
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, f"{key}.{k}", ctx): _convert(vt, v, f"{key}.{k}", ctx) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except ValueError:
            if isinstance(value, str) and value in tp.__members__:
                return tp[value]
        raise ConfigError(f"{key}: {value!r} is not a valid {tp.__name__}; allowed: "
                          f"{', '.join(repr(m.value) for m in tp)}{ctx.where(key)}")
    if tp is bool:  # only real booleans: 0/1 and "yes" strings are too ambiguous
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"{key}: unsupported config type {tp!r}")
    _fail(ctx, key, tp, value)


def _item(tp: Any, value: Any, key: str, i: int, ctx: _Ctx) -> Any:
    """One list item; an error in a named entry (a mapping with a string ``name``) also says which entry
    (``features[12]`` alone is hard to find in a 117-entry file)."""
    try:
        return _convert(tp, value, f"{key}[{i}]", ctx)
    except ConfigError as e:
        name = value.get("name") if isinstance(value, Mapping) else None
        if isinstance(name, str):
            raise ConfigError(f"{e} [{key}[{i}] is {name!r}]") from e
        raise


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def _build(cls: type[T], data: Any, key: str, ctx: _Ctx, base: Any = None) -> T:
    """Instantiate dataclass ``cls`` from mapping ``data``; absent fields come from ``base``
    (the parent field's default instance, so a partial section keeps its other defaults)."""
    section = key or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{section}: expected a mapping for section {cls.__name__}, "
                          f"got {data!r} ({type(data).__name__}){ctx.where(key)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            dotted = f"{key}.{name}" if key else str(name)
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" Did you mean {(key + '.' if key else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {dotted!r}{ctx.where(dotted)}.{hint} "
                              f"Valid keys of {section!r}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        dotted, tp = f"{key}.{name}" if key else name, hints[name]
        if name in data:
            value, dc = data[name], _dataclass_in(tp)
            if isinstance(value, _CliValue) and isinstance(value.parsed, Mapping):  # `model={...}`
                value = value.parsed
            sub = getattr(base, name) if base is not None else _field_default(f)
            if dc is not None and isinstance(sub, dc) and isinstance(value, Mapping):
                kwargs[name] = _build(dc, value, dotted, ctx, base=sub)
            else:
                kwargs[name] = _convert(tp, value, dotted, ctx)
        elif base is not None:
            kwargs[name] = copy.deepcopy(getattr(base, name))
        elif _field_default(f) is _MISSING:
            if not (dataclasses.is_dataclass(tp) and isinstance(tp, type)):
                raise ConfigError(f"missing required key {dotted!r}{ctx.where(dotted)}")
            kwargs[name] = _build(tp, {}, dotted, ctx)  # required section: build from its own defaults
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # range checks in __post_init__
        raise ConfigError(f"invalid {section!r} ({cls.__name__}){ctx.where(key)}: {e}") from e


def _set_override(raw: dict, override: str) -> str:
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or not all(parts):
        raise ConfigError(f"malformed override {override!r}: expected section.key=value")
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = text  # e.g. `run.name=@x`: leave it to the type check
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if isinstance(child, _CliValue) and isinstance(child.parsed, dict):  # after `model={...}`
            child = node[part] = child.parsed
        node = child
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:i + 1])!r} is not a section")
    node[parts[-1]] = _CliValue(parsed, text)
    return key


# the checkout holding `configs/` (an installed wheel: site-packages, with the configs in cmrfm/configs): a relative
# config path not found in the working directory is looked up here, so `--config configs/pretrain/...` works from
# any directory
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def packaged_config(relpath: str) -> Path:
    """The project's own config file `configs/<relpath>`, wherever the project is (a checkout, where
    `cmrfm/configs` links to `configs/`, or an installed wheel, which ships them in `cmrfm/configs`), whatever the
    working directory: found as package data of `cmrfm` through importlib.resources."""
    from importlib.resources import files

    return Path(str(files("cmrfm").joinpath("configs", *Path(relpath).parts)))


def project_path(path: str | os.PathLike) -> Path:
    """A relative path as given when it exists from the working directory, else the project's own file of that
    name (`configs/...` in the checkout, or in the installed wheel's cmrfm/configs), else unchanged."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    return next((root / path for root in (PROJECT_ROOT, PROJECT_ROOT / "cmrfm") if (root / path).exists()), path)


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> T:
    """Build ``cls`` from the YAML mapping at ``path`` (None: defaults only) plus
    ``section.key=value`` overrides (applied to the raw mapping, later ones win)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        path = project_path(path)
        try:
            with open(path, encoding="utf-8") as f:  # a stream, so YAML errors show the file name
                loaded = yaml.load(f, Loader=_UniqueKeyLoader)
        except OSError as e:
            where = "" if path.is_absolute() else (f" (relative paths are read from the current directory, "
                                                   f"{Path.cwd()}, then from the project, {PROJECT_ROOT}: give "
                                                   "an absolute path)")
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}{where}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse config file {path}: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must contain a mapping, got {type(loaded).__name__}")
        raw = loaded or {}
    origins = {}
    for ov in overrides:
        origins[_set_override(raw, ov)] = ov
    return _build(cls, raw, "", _Ctx(path, origins))


def config_from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>") -> T:
    """Build ``cls`` from an in-memory mapping with the same checks as ``load_config``; errors name
    ``source``."""
    return _build(cls, data, "", _Ctx(Path(source), {}))


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML-safe data: Path -> str, Enum -> value, tuple -> list; field order kept."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, enum.Enum):
        return config_to_dict(cfg.value)
    if isinstance(cfg, os.PathLike):
        return os.fspath(cfg)
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {config_to_dict(k): config_to_dict(v) for k, v in cfg.items()}
    return cfg


def flat_config(cfg: Any) -> dict[str, Any]:
    """{"section.key": value} of every leaf (None as "null", lists as their text): TensorBoard's hparams."""
    out: dict[str, Any] = {}

    def walk(x: Any, prefix: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = "null" if x is None else x if isinstance(x, (bool, int, float, str)) else str(x)

    walk(config_to_dict(cfg), "")
    return out


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)


def save_resolved_config(cfg: Any, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the fully resolved config into ``out_dir`` (created) atomically; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / name, dump_config(cfg))
    return out / name
