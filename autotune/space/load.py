"""Reading a space file into a validated `Spec`, and pydantic's errors as one line with the fix.

The first error (an unknown key before the missing field it causes) becomes
`<file>: <field path>: <value> <what is wrong>; <what to do>`, with a did-you-mean for typos and
the section a misplaced field belongs to.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from autotune.space.messages import SpecError, _a, _key, _num, _one_line, _show, _suggest
from autotune.space.parse import parse_yaml
from autotune.space.sections import _SECTIONS, Spec, _section_model

MAX_SPEC_BYTES = 100_000  # a space file is a few dozen lines; parsing stays well under a second

QUICKSTART = "search_spaces/quickstart-cpu.yaml"

_EXAMPLES = {
    "cluster": "cluster: {ranks: 4, memory_gb: 16}",
    "search": "search: {global_batch_size: 16, seq_len: 64}",
    "study": "study: {name: my-study}",
    "cluster.memory_gb": "memory_gb: 16",
    "search.global_batch_size": "global_batch_size: 16",
    "search.seq_len": "seq_len: 64",
    "study.name": "name: my-study",
}


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and re.search(r"[\[(]", part):
            continue  # a union member or validator tag, not a key the user wrote
        else:
            out += ("." if out else "") + _key(part)
    return out or "(top level)"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Spec
    for part in loc:
        if model is None or not isinstance(part, str):
            return None
        field = model.model_fields.get(part)
        ann = _section_model(field.annotation) if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _known_fields(loc: tuple[Any, ...]) -> list[str]:
    model = _model_at(loc[:-1])
    return list(model.model_fields) if model else []


def _unknown_field(loc: tuple[Any, ...]) -> str:
    path, name, known = _path(loc), loc[-1], _known_fields(loc)
    noun = "section" if len(loc) == 1 else "field"
    close = _suggest(name, known)
    if close:
        return f"{path}: unknown {noun}; did you mean {close!r}?"
    homes = [s for s, m in _SECTIONS.items() if isinstance(name, str) and name in m.model_fields]
    if len(loc) == 1 and homes:
        return f"{path}: unknown section; {name} is a field of {homes[0]}: indent it under {homes[0]}:"
    homes = [h for h in homes if h != loc[0]]
    if homes:
        return f"{path}: unknown field; {name} belongs in {homes[0]}: move it to {homes[0]}.{name}"
    return f"{path}: unknown {noun}; remove it, or use one of {', '.join(known)}"


def _bounds(ctx: dict[str, Any]) -> tuple[str, str]:
    if "ge" in ctx:
        return "too small", f"give {_num(ctx['ge'])} or more"
    if "gt" in ctx:
        return "too small", f"give a value above {_num(ctx['gt'])}"
    if "le" in ctx:
        return "too large", f"give {_num(ctx['le'])} or less"
    return "too large", f"give a value below {_num(ctx.get('lt'))}"


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(err.get("loc", ()))
    path = _path(loc)
    kind = err.get("type", "")
    value = err.get("input")
    ctx = err.get("ctx") or {}
    shown = _show(value)
    if kind == "extra_forbidden":
        return _unknown_field(loc)
    if kind == "missing":
        noun = "section" if len(loc) == 1 else "field"
        example = _EXAMPLES.get(path)
        return f"{path}: required {noun} is missing; add it" + (f", e.g. {example}" if example else "")
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if kind == "value_error" and (not loc or isinstance(value, dict)):
        # a rule across fields: its message names the fields itself
        return msg if not loc or msg.startswith(path) else f"{path}: {msg}"
    if kind in ("value_error", "dp_value"):
        return f"{path}: {shown} {msg}"
    if kind == "bool_for_value":
        return f"{path}: {shown} has true/false where {'a number' if _numeric(loc) else 'text'} is expected; " \
               f"write the value itself (YAML reads yes/no/on/off as true/false)"
    if kind in ("int_type", "int_parsing", "int_parsing_size"):
        if isinstance(value, (list, dict)):
            return f"{path}: {shown} is {_a(value)}, not a whole number; give one whole number"
        return f"{path}: {shown} is not a whole number; give a whole number such as 8"
    if kind == "int_from_float":
        return f"{path}: {shown} has a fractional part; give a whole number"
    if kind in ("float_type", "float_parsing"):
        if isinstance(value, (list, dict)):
            return f"{path}: {shown} is {_a(value)}, not a number; give one number"
        return f"{path}: {shown} is not a number; give a number such as 0.5"
    if kind == "finite_number":
        return f"{path}: {shown} is not a finite number; give a finite number"
    if kind in ("bool_type", "bool_parsing"):
        return f"{path}: {shown} is not true or false; give true or false"
    if kind == "string_type":
        return f"{path}: {shown} is {_a(value)}, not text; give text (quote it if it looks like a number)"
    if kind == "list_type":
        return f"{path}: {shown} is {_a(value)}, not a list; give a list such as [1, 2]"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        if value is None:
            return f"{path}: section is empty (null); indent its fields under it, as in {QUICKSTART}"
        return f"{path}: {shown} is {_a(value)}, not a mapping of fields; indent its fields under it, " \
               f"as in {QUICKSTART}"
    if kind == "too_short":
        return f"{path}: {shown} is empty; give at least one value"
    if kind == "string_too_short":
        return f"{path}: {shown} is empty; give a non-empty value" + \
            (f", e.g. {_EXAMPLES[path]}" if path in _EXAMPLES else "")
    if kind == "string_too_long":
        return f"{path}: {shown} is longer than {ctx.get('max_length')} characters; shorten it"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        problem, fix = _bounds(ctx)
        if path == "objective.memory_cap":
            fix += " (a fraction of cluster.memory_gb, e.g. 0.9)"
        elif path == "objective.deploy_headroom":
            fix += " (the fraction of cluster.memory_gb the deployed layout leaves free, e.g. 0.2)"
        return f"{path}: {shown} is {problem}; {fix}"
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        close = _suggest(value, allowed)
        if len(allowed) == 1:
            return f"{path}: {shown} is not supported; use {allowed[0]}"
        hint = f"did you mean {close!r}? " if close else ""
        return f"{path}: {shown} is not one of {', '.join(allowed)}; {hint}use one of them"
    return f"{path}: {shown} is not valid: {msg}"


def _numeric(loc: tuple[Any, ...]) -> bool:
    """Whether the field at `loc` holds numbers (int, float, or a list or optional of them)."""
    model = _model_at(loc[:1])
    names = [p for p in loc[1:] if isinstance(p, str)]
    field = model.model_fields.get(names[0]) if model and names else None
    stack = [field.annotation] if field else []
    while stack:
        t = stack.pop()
        if t in (int, float):
            return True
        stack.extend(get_args(t))
    return False


def _rank(err: dict[str, Any]) -> int:
    """Unknown keys first: a typo'd section also shows up as a missing one, and the typo is the cause."""
    return 0 if err.get("type") == "extra_forbidden" else 1


def _check_keys(data: dict[Any, Any], where: str) -> None:
    """Keys must be names; YAML turns `on:`/`yes:` into true and `1:` into a number, which pydantic can't place."""
    def bad(mapping: dict[Any, Any], section: str | None) -> None:
        for key in mapping:
            if isinstance(key, str):
                continue
            at = f"{section}: " if section else ""
            known = list(_SECTIONS[section].model_fields) if section else list(_SECTIONS)
            extra = " (YAML reads yes/no/on/off as true/false)" if isinstance(key, bool) else ""
            raise SpecError(f"{where}: {at}key {_show(key)} is {_a(key)}, not a "
                            f"{'field' if section else 'section'} name{extra}; use one of {', '.join(known)}")
    bad(data, None)
    for name, section in data.items():
        if name in _SECTIONS and isinstance(section, dict):
            bad(section, name)


def spec_from_data(data: Any, where: str = "space") -> Spec:
    if data is None:
        raise SpecError(f"{where}: the file is empty; start from {QUICKSTART}")
    if not isinstance(data, dict):
        raise SpecError(f"{where}: the top level is {_a(data)}; it must be a mapping of sections "
                        f"(model, cluster, search, ...), as in {QUICKSTART}")
    _check_keys(data, where)
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        errors = sorted(exc.errors(include_url=False), key=_rank)
        raise SpecError(f"{where}: {_describe(errors[0])}"
                        + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")) from None


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Read and validate a space file; every failure is a SpecError with one line."""
    p = Path(path)
    where = _one_line(str(path))
    try:
        st = p.stat()
        if stat.S_ISDIR(st.st_mode):
            raise SpecError(f"{where}: is a directory; give the path of a .yaml file")
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(f"{where}: is not a regular file; give the path of a .yaml file")
        if st.st_size > MAX_SPEC_BYTES:
            raise SpecError(f"{where}: {st.st_size} bytes is larger than the {MAX_SPEC_BYTES} byte limit for a "
                            f"space file; a space file is a few dozen lines")
        with p.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError(f"{where}: larger than the {MAX_SPEC_BYTES} byte limit for a space file; "
                            f"a space file is a few dozen lines")
    except FileNotFoundError:
        raise SpecError(f"{where}: no such file; check the path (ready spaces are in search_spaces/)") from None
    except NotADirectoryError:
        raise SpecError(f"{where}: no such file (a parent of it is not a directory); check the path") from None
    except PermissionError:
        raise SpecError(f"{where}: cannot be read (permission denied); fix its permissions "
                        f"(e.g. chmod u+r) or copy it somewhere readable") from None
    except OSError as exc:
        raise SpecError(f"{where}: cannot be read ({exc.strerror or exc}); check the file") from None
    except ValueError as exc:  # e.g. a NUL byte in the path
        if isinstance(exc, SpecError):
            raise
        raise SpecError(f"{where}: is not a usable path ({exc}); check the path") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{where}: byte {exc.start} (0x{raw[exc.start]:02x}) is not UTF-8 text; "
                        f"save the file as UTF-8") from None
    return spec_from_data(parse_yaml(text, where), where)
