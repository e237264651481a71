"""The device commands without typer: `edgemeta predict|enroll|forget|classes` in a per-image shell
loop would otherwise pay for importing typer and click and building the command tree (≈ 30 ms of a
≈ 200 ms start on a 2-core EPYC, more on a Jetson's ARM cores) at every image.

The options are declared once, with typer, in edgemeta.cli.device. `device_commands.json` beside
this module is generated from those declarations (`python -m edgemeta.cli.fast` rewrites it; a test
holds it equal to them). `run(argv)` reads a command line with it the way click would and calls the
command's body in edgemeta.cli.device_actions. Anything it does not read plainly — `--help`, an
unknown option, a value outside its choices or range, a missing argument — it leaves to typer, which
parses again and answers as it always does, so help and usage errors come from one place."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

SPEC = Path(__file__).with_name("device_commands.json")
FAST_COMMANDS = ("enroll", "predict", "forget", "classes")


def run(argv: list[str]) -> bool:
    """Run `argv` (command name first) if it reads plainly; False leaves it to typer."""
    try:
        spec = json.loads(SPEC.read_text())[argv[0]]
    except (OSError, ValueError, KeyError, IndexError):
        return False
    values = parse(spec, argv[1:])
    if values is None:
        return False
    from edgemeta.cli import device_actions
    from edgemeta.cli.output import run_guarded, say_error
    try:
        run_guarded(getattr(device_actions, argv[0]), **values)
    except KeyboardInterrupt:  # as under click: one line, exit status 1
        say_error("aborted")
        raise SystemExit(1) from None
    return True


def exit_without_teardown() -> None:
    """End a device command that has finished: its output is printed and its files are written
    (stores and caches are written whole and renamed into place before a command returns), and
    the interpreter's teardown would add 20–30 ms to every call of a per-image shell loop, nearly
    all of it ONNX Runtime's native library unwinding its global state (measured on a 2-core EPYC:
    `import onnxruntime` then a normal exit against os._exit). The exit hooks still run (logging's
    shutdown, weakref finalizers, anything a library registered), then the output is flushed and
    the process ends with status 0. Left to the normal exit where it could matter: a tracer or
    profiler (coverage saves its data at exit), a non-daemon thread still running, output that
    cannot be flushed, or an interpreter without CPython's hook runner; a reader that has stopped
    reading ends it quietly (141)."""
    import atexit
    run_exit_hooks = getattr(atexit, "_run_exitfuncs", None)
    threading = sys.modules.get("threading")
    if (run_exit_hooks is None or sys.gettrace() is not None or sys.getprofile() is not None
            or "coverage" in sys.modules
            or (threading is not None and any(t.is_alive() and not t.daemon and t is not threading.main_thread()
                                              for t in threading.enumerate()))):
        return
    run_exit_hooks()  # CPython's: each hook once (the normal exit would find none left)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        from edgemeta.cli.output import end_for_closed_pipe
        end_for_closed_pipe()
    except (OSError, ValueError):
        return
    os._exit(0)


def parse(spec: dict, args: list[str]) -> dict[str, Any] | None:
    """The command's keyword arguments as typer would pass them, or None where typer must decide."""
    options = {opt: p for p in spec["params"] if p["kind"] == "option" for opt in p["opts"]}
    negations = {opt: p for p in spec["params"] if p["kind"] == "option" for opt in p["off"]}
    given: dict[str, Any] = {}
    positional: list[str] = []
    rest = iter(args)
    for token in rest:
        if token == "--":
            positional.extend(rest)
            break
        if not token.startswith("-") or token == "-":
            positional.append(token)
            continue
        name, eq, inline = token.partition("=")
        if name in negations and not eq:
            given[negations[name]["name"]] = False
            continue
        param = options.get(name)
        if param is None:  # --help, an unknown or short option
            return None
        if param["flag"]:
            if eq:
                return None
            given[param["name"]] = True
            continue
        value = inline if eq else next(rest, None)
        if value is None:
            return None
        given[param["name"]] = value  # repeated: the last one counts, as in click
    arguments = [p for p in spec["params"] if p["kind"] == "argument"]
    if not _assign(arguments, positional, given):
        return None
    values: dict[str, Any] = {}
    for p in spec["params"]:
        if p["name"] not in given:
            if p["required"]:
                return None
            values[p["name"]] = None if p["default"] is None else _convert(p, p["default"])
            continue
        raw = given[p["name"]]
        converted = [_convert(p, v) for v in raw] if isinstance(raw, list) else _convert(p, raw)
        if converted is None or (isinstance(converted, list) and None in converted):
            return None
        values[p["name"]] = converted
    return values


def _assign(arguments: list[dict], positional: list[str], given: dict[str, Any]) -> bool:
    """Positional tokens to the arguments in order; the one variadic argument (nargs -1) takes what
    the others leave. False when the count cannot fit."""
    fixed = sum(1 for a in arguments if a["nargs"] == 1)
    if len(positional) < fixed or (len(positional) > fixed and all(a["nargs"] == 1 for a in arguments)):
        return False
    spare = len(positional) - fixed
    i = 0
    for a in arguments:
        if a["nargs"] == 1:
            given[a["name"]] = positional[i]
            i += 1
        elif spare or a["required"]:
            if not spare:
                return False
            given[a["name"]] = positional[i:i + spare]
            i += spare
    return True


def _convert(param: dict, text: Any) -> Any:
    """One value as click's type would give it; None where click would refuse it."""
    kind = param["type"]
    if isinstance(text, bool):
        return text
    if kind == "path":
        return Path(text)
    if kind == "choice":
        return text if text in param["choices"] else None
    if kind == "int":
        try:
            number = int(text)
        except ValueError:
            return None
        low, high = param.get("min"), param.get("max")
        return None if (low is not None and number < low) or (high is not None and number > high) else number
    if param.get("check") == "backend":
        from edgemeta.runtime.backends import parse_backend
        from edgemeta.runtime.errors import ConfigError
        try:
            parse_backend(text)
        except ConfigError:
            return None
    return text


def describe(app) -> dict:
    """device_commands.json's content, from the typer declarations of FAST_COMMANDS. A declaration
    this module cannot read plainly (a multiple option, an environment variable, an unknown type or
    callback) fails here, so the file cannot silently drift from what typer would do."""
    import click
    import typer.main
    group = typer.main.get_command(app)
    spec = {}
    for name in FAST_COMMANDS:
        params = []
        for p in group.commands[name].params:  # type: ignore[attr-defined]  # a Group's commands
            if p.multiple or getattr(p, "envvar", None) or not p.expose_value:
                raise ValueError(f"{name} --{p.name}: the fast path reads single values only")
            if isinstance(p.type, click.Path):
                kind = "path"
            elif isinstance(p.type, click.Choice):
                kind = "choice"
            elif isinstance(p.type, click.types.IntParamType):
                kind = "int"
            elif isinstance(p.type, click.types.StringParamType) or (isinstance(p.type, click.types.BoolParamType)
                                                                      and getattr(p, "is_flag", False)):
                kind = "text"
            else:
                raise ValueError(f"{name} --{p.name}: type {p.type!r} is not one the fast path reads")
            entry: dict[str, Any] = {"name": p.name, "kind": "argument" if isinstance(p, click.Argument) else "option",
                                     "opts": list(p.opts), "off": list(p.secondary_opts), "nargs": p.nargs,
                                     "required": p.required, "default": p.default, "type": kind,
                                     "flag": bool(getattr(p, "is_flag", False))}
            if isinstance(p.type, click.Choice):
                entry["choices"] = list(p.type.choices)
            if isinstance(p.type, click.IntRange):
                if p.type.min_open or p.type.max_open or p.type.clamp:
                    raise ValueError(f"{name} --{p.name}: open or clamped ranges are not read by the fast path")
                entry["min"], entry["max"] = p.type.min, p.type.max
            if p.callback is not None:
                check = getattr(p.callback, "fast_check", None)
                if check != "backend":
                    raise ValueError(f"{name} --{p.name}: its callback has no fast_check the fast path knows")
                entry["check"] = check
            params.append(entry)
        spec[name] = {"params": params}
    return spec


def write() -> None:
    import edgemeta.cli.device  # noqa: F401  (registers the device commands on the app)
    from edgemeta.cli.common import app
    SPEC.write_text(json.dumps(describe(app), indent=1) + "\n")


if __name__ == "__main__":
    write()
