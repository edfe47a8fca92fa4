"""Statuses, result records and the one convention for raising on failure.

* `Status`: every solver's outcome, with its message. The codes follow `scipy.optimize.linprog`
  (0 optimal, 1 iteration limit, 2 infeasible, 3 unbounded, 4 numerical difficulties), plus 5 for
  a solve of an approximation (K-FAC / EK-FAC solve their factored curvature exactly, which bounds
  nothing about the true system). Device code returns statuses as int32 arrays (an `IntEnum`
  member is an int, so ``jnp.where(ok, Status.SUCCESS, ...)`` works under `jit`).
* `pytree_result`: every public result is a frozen dataclass registered as a pytree through this
  one decorator: its array fields are the leaves, everything else metadata (dicts and lists
  hashed by their JSON text, so a result can pass through `jax.jit`).
* `raise_for_status`: outside `jit`, a front door called with ``throw=True`` raises
  `NumericalError` through this function; otherwise the result carries its status and the
  caller decides. Device functions never raise on values.
"""

from __future__ import annotations

import dataclasses
import enum
import json

from .checks import NumericalError


class Status(enum.IntEnum):
    """A solver's outcome (`scipy.optimize.linprog`'s codes, and APPROXIMATE); `message` says it.

    Example:
        >>> from pareto_jax import Status
        >>> Status(2).message, int(Status.SUCCESS)
        ('infeasible', 0)
    """

    SUCCESS = 0
    ITERATION_LIMIT = 1
    INFEASIBLE = 2
    UNBOUNDED = 3
    NUMERICAL = 4
    APPROXIMATE = 5

    @property
    def message(self) -> str:
        return MESSAGES[self]


MESSAGES = {Status.SUCCESS: "optimal", Status.ITERATION_LIMIT: "iteration limit reached",
    Status.INFEASIBLE: "infeasible", Status.UNBOUNDED: "unbounded",
    Status.NUMERICAL: "numerical difficulties",
    Status.APPROXIMATE: "solved an approximation of the system (no tolerance on the true residual)"}


def message(status: int) -> str:
    """The message of a status code (an unknown code says so)."""
    try:
        return Status(int(status)).message
    except ValueError:
        return f"unknown status {int(status)}"


def raise_for_status(
    status: int, stage: str, detail: str = "", *, allowed=(Status.SUCCESS,)
) -> None:
    """Raise `NumericalError` naming the stage unless `status` is one of `allowed`."""
    if int(status) not in tuple(int(a) for a in allowed):
        extra = f": {detail}" if detail else ""
        raise NumericalError(f"{stage}: status {int(status)} ({message(status)}){extra}.")


class _Static:
    """A JSON-like value (dict, list) as pytree metadata: hashed and compared by its JSON text."""

    def __init__(self, value):
        self.value = value
        self._key = json.dumps(_jsonable(value), sort_keys=True, default=str)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key == other._key


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)


def _hashable(v):
    try:
        hash(v)
        return v
    except TypeError:  # a dict, a list, a tuple of dicts: metadata hashed by its JSON text
        return _Static(v)


def pytree_result(*, data: tuple[str, ...]):
    """Class decorator: a frozen dataclass whose `data` fields are pytree leaves (arrays, or None)
    and whose other fields are metadata. The one registration every result record uses."""

    def register(cls):
        import jax

        names = tuple(f.name for f in dataclasses.fields(cls))
        meta = tuple(n for n in names if n not in data)
        unknown = set(data) - set(names)
        if unknown:
            raise TypeError(f"{cls.__name__}: data fields {sorted(unknown)} are not fields")

        def flatten(r):
            return tuple(getattr(r, k) for k in data), tuple(_hashable(getattr(r, k)) for k in meta)

        def unflatten(m, leaves):
            m = [x.value if isinstance(x, _Static) else x for x in m]
            return cls(**dict(zip(data, leaves)), **dict(zip(meta, m)))

        jax.tree_util.register_pytree_node(cls, flatten, unflatten)
        return cls

    return register
