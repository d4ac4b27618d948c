"""Flag files: the trainer's flags read from a TOML or JSON file, each wrong key or value refused in one line."""
import json
import os
import re
import tomllib

from mupgpt.errors import UsageError, did_you_mean

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


class _RepeatedKey(Exception):
    pass


def _no_repeated_keys(pairs):
    """json's object hook: a key given twice in one object is refused, as TOML does."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _RepeatedKey(key)
        seen.add(key)
    return dict(pairs)


def _load_config_text(path):
    """The file's text and its parsed table (one line per way a file can be wrong)."""
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: {'is a folder' if os.path.isdir(path) else 'no such file'}: "
                         "give a .toml or .json file")
    kind = os.path.splitext(path)[1].lower()
    if kind not in (".toml", ".json"):
        raise UsageError(f"--config {path}: name it .toml or .json (the suffix picks the format)")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path} is unreadable ({type(e).__name__}): "
                         "give a UTF-8 .toml or .json file") from None
    try:
        data = tomllib.loads(text) if kind == ".toml" else json.loads(text, object_pairs_hook=_no_repeated_keys)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML: {e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except _RepeatedKey as e:
        key = e.args[0]
        at = [n for n, line in enumerate(text.splitlines(), 1) if re.search(rf'"{re.escape(key)}"\s*:', line)]
        where = f" (lines {', '.join(map(str, at))})" if len(at) > 1 else ""
        raise UsageError(f"{path}: key {key!r} is given twice{where}: keep one") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds a JSON {type(data).__name__}, not an object of flag names and values")
    return kind, text, data


def _flatten(table, prefix=""):
    """(dotted name, key, value) for every value; tables only group keys."""
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield prefix + key, key, value


def _checked_value(action, want, full, value, where):
    """The value for a flag of Python type `want`, or one line saying what kind or choice it must be."""
    ok = (isinstance(value, bool) if want is bool else
          isinstance(value, want) and not isinstance(value, bool) or
          want is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise UsageError(f"{where}: {full} must be {_KINDS[want]}, not {value!r}")
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{where}: {full} must be one of {', '.join(map(str, action.choices))}, not {value!r}"
                         f"{did_you_mean(str(value), [str(c) for c in action.choices])}")
    return float(value) if want is float else value


def read_config_file(path, parser, types):
    """A TOML (.toml) or JSON (.json) file of flag values -> {dest: value}, for the flags of `parser` whose
    Python types `types` gives by dest. Keys are the flag names without dashes (aliases such as lr and width
    too); tables only group keys and their names are ignored."""
    kind, text, data = _load_config_text(path)
    dests = {}  # a key as written in the file ('lr', 'learning_rate') -> the flag it sets
    for a in parser._actions:
        if a.dest not in ("help", "config", "num_gpus"):
            for opt in a.option_strings:
                dests[opt.lstrip("-")] = a

    def where(key):
        pattern = rf'^\s*"?{re.escape(key)}"?\s*=' if kind == ".toml" else rf'"{re.escape(key)}"\s*:'
        n = next((n for n, line in enumerate(text.splitlines(), 1) if re.search(pattern, line)), None)
        return f"{path} line {n}" if n else path

    out, seen = {}, {}
    for full, key, value in _flatten(data):
        action = dests.get(key)
        if action is None:
            raise UsageError(f"{where(key)}: unknown key {full!r}{did_you_mean(key, sorted(dests))}: "
                             "keys are the trainer's flag names (see --help)")
        if action.dest in seen:
            raise UsageError(f"{where(key)}: {full!r} sets {action.dest} again (also set by {seen[action.dest]!r}): "
                             "keep one")
        seen[action.dest] = full
        out[action.dest] = _checked_value(action, types[action.dest], full, value, where(key))
    return out
