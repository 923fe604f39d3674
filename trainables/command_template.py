"""A user's command template: placeholders filled per trial, one argv element per item.

The template runs **without a shell**: no quoting, globbing, pipes or `$VARS`; a value can never
become a second argument. Placeholders, filled per trial:

    whole numbers  {ep} {tp} {pp} {dp} {micro_batch_size} {global_batch_size} {seq_len}
                   {nproc} {nnodes} {node_rank} {master_port} {world_size} {seed} {grad_accum}
    text           {precision} {recompute} {schedule} {master_addr} {metrics_file} {trial_dir}
                   {dtype} {bf16} {fp16} {recompute_on}

The last four spell the layout the way frameworks' flags want it (`layout_spellings`):
`{dtype}` is float32 | bfloat16 | float16 (torchtitan's `--training.mixed_precision_param`),
`{bf16}`/`{fp16}`/`{recompute_on}` are true | false (Hugging Face `TrainingArguments`' `--bf16`,
`--fp16`, `--gradient_checkpointing`), and `{grad_accum}` is the number of micro-batches per
step and data-parallel rank: global batch / (micro-batch x dp x ep).

`{{` and `}}` are literal braces. Text values may only use letters, digits and `. _ : / @ -`
and may not start with `-`.
"""

from __future__ import annotations

import difflib
import operator
import re
import shlex
from typing import Any, Mapping, Sequence

INT_PLACEHOLDERS: tuple[str, ...] = (
    "ep", "tp", "pp", "dp", "micro_batch_size", "global_batch_size", "seq_len",
    "nproc", "nnodes", "node_rank", "master_port", "world_size", "seed", "grad_accum",
)
TEXT_PLACEHOLDERS: tuple[str, ...] = (
    "precision", "recompute", "schedule", "master_addr", "metrics_file", "trial_dir",
    "dtype", "bf16", "fp16", "recompute_on",
)
PLACEHOLDERS: tuple[str, ...] = INT_PLACEHOLDERS + TEXT_PLACEHOLDERS

SAFE_TEXT = re.compile(r"[A-Za-z0-9._:/@-]+")
SAFE_CHARS = "letters, digits and . _ : / @ -"
MAX_TEXT = 4096


class TemplateError(ValueError):
    """A command template or a value for it that cannot be used; one line naming the item and the fix."""


# ---------------------------------------------------------------------------------------------
# The template


_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def _where(index: int, item: str) -> str:
    shown = item if len(item) <= 60 else item[:57] + "..."
    return f"template item {index} ({shown!r})"


def _parse_item(index: int, item: Any) -> list[tuple[str, str]]:
    """An item as (kind, text) parts: ('text', literal) or ('field', placeholder name)."""
    if not isinstance(item, str):
        kind = "true/false" if isinstance(item, bool) else type(item).__name__
        raise TemplateError(f"template item {index} is {kind} ({item!r}), not text; write every argv element "
                            f"as a string, e.g. {str(item)!r}")
    if "\x00" in item:
        raise TemplateError(f"{_where(index, item)} holds a NUL character, which no argument can carry; remove it")
    parts: list[tuple[str, str]] = []
    pos = 0
    for m in _TOKEN.finditer(item):
        if m.start() > pos:
            parts.append(("text", item[pos:m.start()]))
        pos = m.end()
        token = m.group(0)
        if token in ("{{", "}}"):
            parts.append(("text", token[0]))
        elif token in ("{", "}"):
            raise TemplateError(f"{_where(index, item)}: unmatched {token!r} at column {m.start() + 1}; write "
                                f"{token * 2!r} for a literal brace, or a placeholder such as '{{ep}}'")
        else:
            name = m.group(1)
            if name not in PLACEHOLDERS:
                raise TemplateError(f"{_where(index, item)}: {_unknown(name)}")
            parts.append(("field", name))
    if pos < len(item):
        parts.append(("text", item[pos:]))
    return parts


def _unknown(name: str) -> str:
    if not name.strip():
        return "empty placeholder {}; write a name such as {ep}, or {{}} for literal braces"
    base = re.split(r"[:!.\[]", name, maxsplit=1)[0].strip()
    if base in PLACEHOLDERS and base != name:
        return (f"{{{name}}} has a format spec, conversion or attribute; write {{{base}}} "
                f"(the value is inserted as it is)")
    close = difflib.get_close_matches(name, PLACEHOLDERS, n=1, cutoff=0.6)
    hint = f"did you mean {{{close[0]}}}? " if close else ""
    return (f"unknown placeholder {{{name}}}; {hint}use one of "
            + " ".join("{" + p + "}" for p in PLACEHOLDERS) + " (or {{ }} for literal braces)")


def check_template(template: Sequence[str]) -> set[str]:
    """Validate a template's syntax; return the placeholders it uses."""
    if isinstance(template, (str, bytes)):
        raise TemplateError("the command template is text, not a list; give one string per argument, "
                            f"e.g. {shlex.split(template if isinstance(template, str) else template.decode())!r} "
                            f"(it runs without a shell)")
    if not isinstance(template, (list, tuple)):
        raise TemplateError(f"the command template is {type(template).__name__}, not a list of strings; "
                            f"give one string per argument")
    if not template:
        raise TemplateError("the command template is empty; give the program and its arguments, "
                            "e.g. ['python', 'train.py', '--ep', '{ep}']")
    used: set[str] = set()
    for i, item in enumerate(template):
        used.update(name for kind, name in _parse_item(i, item) if kind == "field")
    if not template[0].strip():
        raise TemplateError("template item 0 (the program) is empty; give the program to run")
    return used


def _check_value(name: str, value: Any, where: str) -> str:
    if name in INT_PLACEHOLDERS:
        try:
            if isinstance(value, bool):
                raise TypeError
            number = operator.index(value)
        except TypeError:
            raise TemplateError(f"{where}: {{{name}}} must be a whole number, got {type(value).__name__} "
                                f"{value!r}; pass an int") from None
        if number < 0:
            raise TemplateError(f"{where}: {{{name}}} is {number}; it must be 0 or more")
        return str(number)
    if not isinstance(value, str):
        raise TemplateError(f"{where}: {{{name}}} must be text, got {type(value).__name__} {value!r}; "
                            f"pass a string")
    if not value:
        raise TemplateError(f"{where}: {{{name}}} is empty; give a non-empty value")
    if len(value) > MAX_TEXT:
        raise TemplateError(f"{where}: {{{name}}} is {len(value)} characters long, over {MAX_TEXT}; shorten it")
    if not SAFE_TEXT.fullmatch(value):
        bad = next(c for c in value if not SAFE_TEXT.fullmatch(c))
        raise TemplateError(f"{where}: {{{name}}} value {value!r} holds {bad!r}; values may only use "
                            f"{SAFE_CHARS} (the command runs without a shell, each value stays one argument)")
    if value.startswith("-"):
        raise TemplateError(f"{where}: {{{name}}} value {value!r} starts with '-', which the program would read "
                            f"as an option; give a value that starts with a letter, digit, '.' or '/'")
    return value


def render_argv(template: Sequence[str], values: Mapping[str, object]) -> list[str]:
    """Fill a command template for one trial: one template item -> one argv element.

    Only the placeholders the template uses need a value; other keys of `values` are ignored.
    Raises `TemplateError` (a ValueError) naming the item and the fix.
    """
    check_template(template)
    argv: list[str] = []
    for i, item in enumerate(template):
        out = []
        for kind, text in _parse_item(i, item):
            if kind == "text":
                out.append(text)
                continue
            if text not in values:
                raise TemplateError(f"{_where(i, item)}: no value for {{{text}}}; pass it in the values "
                                    f"(or remove the placeholder)")
            out.append(_check_value(text, values[text], _where(i, item)))
        argv.append("".join(out))
    return argv


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def layout_spellings(precision: str, recompute: str, global_batch_size: int, micro_batch_size: int,
                     dp: int, ep: int) -> dict[str, object]:
    """The derived placeholders: the layout as frameworks' own flags spell it."""
    per_step = micro_batch_size * dp * ep
    return {"dtype": _DTYPES.get(precision, precision),
            "bf16": "true" if precision == "bf16" else "false",
            "fp16": "true" if precision == "fp16" else "false",
            "recompute_on": "false" if recompute == "none" else "true",
            "grad_accum": max(1, global_batch_size // per_step) if per_step > 0 else 1}
