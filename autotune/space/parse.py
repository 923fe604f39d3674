"""Space-file text -> plain Python values with `yaml.safe_load`-level constructs only.

Duplicate keys, unhashable keys, scalars Python cannot build, runaway nesting and alias
expansion past a bound all fail with a `SpecError` at their line and column, so a hostile or
broken file can never do more than fail.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from autotune.space.messages import SpecError, _a, _key, _show

MAX_YAML_NODES = 100_000


class _Problem(Exception):
    """Something YAML accepts (or chokes on) that a space file must not have, at its position."""

    def __init__(self, mark: yaml.Mark, text: str) -> None:
        super().__init__(text)
        self.mark, self.text = mark, text


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses duplicated keys instead of silently keeping the last one, and reports
    keys and scalars Python cannot use at their line and column."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        mark = key_node.start_mark
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise _Problem(mark, f"{_a(key)} cannot be a key; use a plain name such as search") from None
        if key in seen:
            first = seen[key].start_mark
            raise _Problem(mark, f"duplicated key {_key(key)} (first at line {first.line + 1}); keep one of them")
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _readable(tag: str, what: str) -> None:
    """Scalars Python cannot build (a 5000-digit integer, the 45th of a month) as positioned errors."""
    build = yaml.SafeLoader.yaml_constructors[tag]

    def construct(loader: _UniqueKeyLoader, node: yaml.Node) -> Any:
        try:
            return build(loader, node)
        except (ValueError, OverflowError) as exc:
            reason = str(exc).split(";")[0].split(":")[0]
            raise _Problem(node.start_mark, f"{_show(node.value)} looks like {what} but cannot be read as one "
                                            f"({reason}); write a smaller or valid value, or quote it "
                                            f"if it is text") from None

    _UniqueKeyLoader.add_constructor(tag, construct)


_readable("tag:yaml.org,2002:int", "a whole number")
_readable("tag:yaml.org,2002:float", "a number")
_readable("tag:yaml.org,2002:timestamp", "a date")


def _expanded_size(node: yaml.Node, budget: int) -> int:
    """Nodes after alias expansion, counting up to `budget` (a billion-laughs file stops early)."""
    count, stack = 0, [node]
    while stack:
        n = stack.pop()
        count += 1
        if count > budget:
            return count
        if isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack.extend((k, v))
    return count


def parse_yaml(text: str, where: str) -> Any:
    try:
        loader = _UniqueKeyLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
                raise SpecError(f"{where}: more than {MAX_YAML_NODES} values after expanding aliases; "
                                f"write the space out without nested anchors")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except SpecError as exc:
        raise SpecError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None
    except _Problem as exc:
        raise SpecError(f"{where}:{exc.mark.line + 1}:{exc.mark.column + 1}: {exc.text}") from None
    except RecursionError:
        raise SpecError(f"{where}: values are nested too deeply (hundreds of levels); a space file needs "
                        f"three or four") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        opened = exc.context_mark
        if exc.problem and exc.context and opened and mark and opened.line != mark.line and \
                exc.context.startswith("while "):
            what = exc.context.removeprefix("while ").removeprefix("parsing ").removeprefix("scanning ")
            problem += f" ({what} opened at {opened.line + 1}:{opened.column + 1})"
        if "\\t" in problem or "'\\t'" in problem or "tab" in problem:
            fix = "indent with spaces, not tabs"
        elif "could not determine a constructor" in problem:
            tag = re.search(r"tag '([^']*)'", problem)
            name = tag.group(1).replace("tag:yaml.org,2002:", "!!") if tag else "used here"
            problem = f"the tag {name} is not allowed"
            fix = "remove it (a space file holds plain values only)"
        elif "<block end>" in problem:
            fix = "indent this line like the lines of the same level above it"
        elif "undefined alias" in problem:
            fix = "define the anchor (&name) before using it, or write the value out"
        else:
            fix = "fix the YAML syntax at that position"
        raise SpecError(f"{where}{pos}: YAML syntax error: {problem}; {fix}") from None
    except yaml.reader.ReaderError as exc:
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        line = text.count("\n", 0, exc.position) + 1
        raise SpecError(f"{where}:{line}: character #x{code:04x} is not allowed in YAML; remove it "
                        f"(is this a text file?)") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{where}: YAML error: {str(exc).splitlines()[0]}; fix the file's syntax") from None
