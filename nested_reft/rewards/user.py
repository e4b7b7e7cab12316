"""Users' reward functions: naming them, importing them, calling them, and describing what went wrong.

A user's function is named by a ref: `path/to/file.py:function` (a file, imported under a name of its own) or
`package.module:function` (anything importable); `function` may be dotted (`module:Class.method`). Importing and
calling happen inside a reward worker process (`rewards.workers`); both answer with a JSON-ready reply instead of
raising, so that the trainer can turn any fault into one line.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

_MAX_TEXT = 200  # characters of an error message or a bad value kept in a reply
_IMPORTLIB = str(Path(importlib.__file__).parent)


def split_ref(ref: str) -> tuple[str, str] | None:
    """(file or module, attribute) of `path/to/file.py:function` or `package.module:function`; None when `ref`
    is not of either form."""
    target, sep, attribute = ref.rpartition(":")
    if not sep or not target.strip() or not attribute.strip() or not all(attribute.split(".")):
        return None
    return target, attribute


def is_file_ref(ref: str) -> bool:
    """Whether `ref` names a function in a `.py` file (rather than in an importable module)."""
    parts = split_ref(ref)
    return parts is not None and parts[0].endswith(".py")


def resolve(ref: str) -> Callable:
    """The callable `ref` names. Raises ImportError (or whatever importing it raises) with a one-line reason."""
    parts = split_ref(ref)
    if parts is None:
        raise ImportError(f"{ref!r} is not path/to/file.py:function or package.module:function")
    target, attribute = parts
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ImportError(f"{path}: no such file")
        # A name of its own per file, registered in sys.modules: dataclasses and pickle look modules up by name.
        name = f"nested_reft_user_{path.stem}_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            defined = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
            raise ImportError(f"{target} has no {attribute!r} (it defines: {', '.join(defined) or 'no function'})")
        found = getattr(found, part)
    if not callable(found):
        raise ImportError(f"{target}:{attribute} is a {type(found).__name__}, not a function")
    return found


def load(ref: str, functions: dict[str, Callable]) -> list:
    """Import `ref` into `functions`: ["ok", the function's `__name__`] or ["load_error", why] (one line)."""
    try:
        function = resolve(ref)
    except (Exception, SystemExit) as exc:
        where = _location(exc.filename, exc.lineno) if isinstance(exc, SyntaxError) else _where(exc)
        return ["load_error", f"cannot import {ref}: {describe(exc)}" + (f" ({where})" if where else "")]
    functions[ref] = function
    return ["ok", getattr(function, "__name__", split_ref(ref)[1].rsplit(".", 1)[-1])]


def call(function: Callable, kwargs: dict[str, Any]) -> list:
    """Call `function(**kwargs)`: ["ok", values] (see `coerce`), ["not_a_list", type name], or ["raised", "Type:
    message", "file.py line N"] (the innermost line of the function's own file, where there is one)."""
    try:
        return coerce(function(**kwargs))
    except (Exception, SystemExit) as exc:
        return ["raised", describe(exc), _where(exc, getattr(getattr(function, "__code__", None), "co_filename", None))]


def coerce(result: Any) -> list:
    """A function's result as a JSON-ready reply: ["ok", [float | None | {"bad": repr, "type": name}, ...]], or
    ["not_a_list", type name] when it is not a sequence of values. Numbers of any kind (bool, numpy, 0-d tensors)
    become floats; whether there is one per completion and each is finite is the caller's to judge."""
    if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Iterable):
        return ["not_a_list", type(result).__name__]
    return ["ok", [_number(value) for value in result]]


def _number(value: Any) -> float | None | dict[str, str]:
    if value is None:
        return None
    if not isinstance(value, (str, bytes)):  # "0.5" is text, not a reward
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    return {"bad": repr(value)[:_MAX_TEXT], "type": type(value).__name__}


def describe(exc: BaseException) -> str:
    """`Type: message` of an exception, on one line and at most a couple of hundred characters."""
    message = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


def _where(exc: BaseException, filename: str | None = None) -> str:
    """"file.py line N": the innermost frame of `filename` in the traceback, else the innermost frame ("" if none)."""
    # Ours (the call, the import) and importlib's say nothing about the user's code.
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f.filename != __file__ and f.filename[:1] != "<" and not f.filename.startswith(_IMPORTLIB)]
    own = [f for f in frames if filename is not None and f.filename == filename] or frames
    return _location(own[-1].filename, own[-1].lineno) if own else ""


def _location(filename: str | None, lineno: int | None) -> str:
    return f"{Path(filename or '?').name} line {lineno}"
