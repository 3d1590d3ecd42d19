"""Your own metrics (evaluate.metrics): `module:function` names imported from the project folder and called with the
model, its tokenizer and the val tokens. This runs your code, as a Trainer's compute_metrics does."""

from __future__ import annotations

import importlib
import math
import numbers
import sys
import traceback
from pathlib import Path

from pipeline.errors import UserError

KEY = "evaluate.metrics"
BUILT_IN = ("val", "hellaswag", "lm_eval", "model", "notes")  # metrics.json's own sections


def custom_metrics(names: list[str], model, tokenizer, val_tokens, project: str | Path = ".") -> dict:
    """{function name: its result} for each name; a result is a number ({"value": x}) or a dict of numbers."""
    folder = str(Path(project).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the project's own modules, as `python -m` from there would see them
    results = {}
    for name in names:
        module_name, function_name = name.split(":")
        function = load_function(module_name, function_name, folder)
        try:
            result = function(model=model, tokenizer=tokenizer, val_tokens=val_tokens)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code failed (or tried to end the stage): where, in one message
            raise UserError(f"{KEY}: {name} {failure(e)} ({where(e, folder)})") from None
        key = function_name if function_name not in BUILT_IN and function_name not in results else name
        results[key] = checked_result(name, result)
    return results


def load_function(module_name: str, function_name: str, folder: str):
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise UserError(f"{KEY}: no module {module_name!r} in {folder} (a file {module_name.replace('.', '/')}.py there)") from None
        raise UserError(f"{KEY}: importing {module_name} failed: {e} ({where(e, folder)})") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the module's own code failed as it was imported
        raise UserError(f"{KEY}: importing {module_name} {failure(e)} ({where(e, folder)})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"{KEY}: {module_name} ({module.__file__}) has no function {function_name!r}")
    return function


def failure(e: BaseException) -> str:
    """What the user's code did: an exception it raised, or sys.exit, which must not end the stage as if it had finished
    (the stage's own metrics file would then be missing, or an earlier one taken for this run's)."""
    if isinstance(e, SystemExit):
        return f"called sys.exit({e.code!r}) before the stage wrote its metrics: a metric function returns its result"
    return f"raised {type(e).__name__}: {e}"


def checked_result(name: str, result) -> dict:
    """A number becomes {"value": x}; a dict must map names to numbers (JSON for metrics.json and dvc exp show).
    numpy and 0-d torch numbers count as numbers."""

    def number(value):
        value = value.item() if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 else value
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        return (int(value) if isinstance(value, numbers.Integral) else float(value)) if ok else None

    if number(result) is not None:
        result = {"value": result}
    elif isinstance(result, numbers.Real) or hasattr(result, "item") and getattr(result, "ndim", None) == 0:
        raise UserError(f"{KEY}: {name} returned {result!r}; a metric must be a finite number")
    if not isinstance(result, dict) or not result:
        raise UserError(f"{KEY}: {name} returned {type(result).__name__}; return a number or a dict of names to numbers")
    checked = {}
    for key, value in result.items():
        if not isinstance(key, str) or number(value) is None:
            raise UserError(f"{KEY}: {name} returned {key!r}: {value!r}; every value must be a finite number")
        checked[key] = number(value)
    return checked


def where(e: BaseException, folder: str = "") -> str:
    """file:line of the innermost frame of e in the project folder (your code, not the library it called), else of all."""
    frames = traceback.extract_tb(e.__traceback__)
    own = [f for f in frames if folder and f.filename.startswith(folder + "/")]
    frame = (own or frames or [None])[-1]
    return f"{frame.filename}:{frame.lineno}" if frame else "no traceback"
