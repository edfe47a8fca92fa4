"""JAX's persistent compilation cache, on by default in a user cache folder.

A first call of a jitted solver compiles for seconds (the reweighting program, about 5 s per new
padded size on a laptop CPU); with the cache, a second process loads the compiled program
instead. The command line and `pipeline.run` turn it on (importing the package changes no JAX
setting), in ``$PARETO_JAX_CACHE_DIR`` or ``$XDG_CACHE_HOME/pareto_jax/xla``
(``~/.cache/pareto_jax/xla``), unless the process has already chosen a cache folder of its own
(``jax_compilation_cache_dir``) or ``PARETO_JAX_COMPILATION_CACHE=0`` is set; `enable()` turns it
on in a notebook. Only compilations over one second are stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

OFF = ("0", "off", "false", "no")


def default_dir() -> Path:
    if os.environ.get("PARETO_JAX_CACHE_DIR"):
        return Path(os.environ["PARETO_JAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pareto_jax" / "xla"


def enable(path: str | os.PathLike | None = None) -> Path | None:
    """Turn the persistent cache on (in `path`, or `default_dir()`); returns the folder in use,
    or None when it is off (by the environment) or the folder cannot be created."""
    if path is None:
        if os.environ.get("PARETO_JAX_COMPILATION_CACHE", "1").lower() in OFF:
            return None
        current = jax.config.jax_compilation_cache_dir
        if current:  # the user's own choice stands
            return Path(current)
        path = default_dir()
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def disable() -> None:
    """Turn the persistent cache off for this process."""
    jax.config.update("jax_compilation_cache_dir", None)
