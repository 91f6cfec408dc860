"""Loading ml_collections config files by preset name or path, with ``--config.a.b=value`` overrides."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os

import ml_collections


def _load_module(name_or_path: str):
    if name_or_path.endswith(".py") or os.sep in name_or_path:
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"config file not found: {name_or_path}")
        spec = importlib.util.spec_from_file_location("_infinitevl_config", name_or_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(f"infinitevl_jax.configs.{name_or_path}")
    except ModuleNotFoundError as e:
        if e.name != f"infinitevl_jax.configs.{name_or_path}":
            raise
        raise ValueError(f"no config preset named {name_or_path!r}; presets: {list_presets()}") from None


def list_presets() -> list[str]:
    from infinitevl_jax import configs
    folder = os.path.dirname(configs.__file__)
    return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))


def _parse_value(text: str, current):
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"cannot parse {text!r} as a value for a field holding {current!r}") from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies ``config.a.b=value`` (a leading ``--`` is optional) to existing fields only."""
    for item in overrides:
        key, sep, text = item.lstrip("-").partition("=")
        if not sep or not key.startswith("config."):
            raise ValueError(f"override {item!r} must look like --config.path.to.field=value")
        *parents, leaf = key[len("config."):].split(".")
        node = config
        for p in parents:
            if p not in node:
                raise ValueError(f"override {item!r}: no config field {p!r}")
            node = node[p]
        if leaf not in node:
            raise ValueError(f"override {item!r}: no config field {leaf!r} (fields: {sorted(node.keys())})")
        node[leaf] = _parse_value(text, node[leaf])
    return config


def load_config(name_or_path: str, overrides: list[str] | None = None, arg: str | None = None
                ) -> ml_collections.ConfigDict:
    """A preset name from ``configs/`` (e.g. ``"tiny"``) or a path to a config ``.py`` file;
    ``arg`` is passed to its ``get_config(arg)`` (e.g. the quickstart's architecture)."""
    module = _load_module(name_or_path)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config {name_or_path!r} defines no get_config()")
    if arg is None:
        return apply_overrides(module.get_config(), overrides or [])
    if not inspect.signature(module.get_config).parameters:
        raise ValueError(f"config {name_or_path!r} takes no argument (given {arg!r}): its get_config() has none")
    return apply_overrides(module.get_config(arg), overrides or [])
