"""
Let trial run the unit tests too (DESIGN.md: "trial must still be able to run
the unit tests").  The unit tests are plain functions, which pytest collects;
trial collects only TestCase classes, so each unit module ends with

    TrialTests = trial_case(globals())

which wraps every ``test_*`` function of the module (each parametrized case
expanded) as a method of one SynchronousTestCase.  pytest ignores that class
(``__test__ = False``), so nothing runs twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.trial.unittest import SynchronousTestCase


def _method(func: Callable[..., None], kwargs: Mapping[str, Any]) -> Callable[[Any], None]:
    def run(self: SynchronousTestCase) -> None:
        func(**kwargs)

    run.__doc__ = func.__doc__
    return run


def trial_case(namespace: dict[str, Any]) -> type[SynchronousTestCase]:
    methods: dict[str, Any] = {"__test__": False, "__module__": namespace["__name__"]}
    for name, func in list(namespace.items()):
        if not name.startswith("test_") or isinstance(func, type) or not callable(func):
            continue
        marks = [m for m in getattr(func, "pytestmark", []) if m.name == "parametrize"]
        if not marks:
            methods[name] = _method(func, {})
            continue
        argnames, values = marks[0].args[:2]
        names = [n.strip() for n in argnames.split(",")] if isinstance(argnames, str) else argnames
        for i, value in enumerate(values):
            args = value if len(names) > 1 else (value,)
            methods[f"{name}_{i}"] = _method(func, dict(zip(names, args, strict=True)))
    return type("TrialTests", (SynchronousTestCase,), methods)
