"""`acb-run --auto`: run an unmodified PyTorch program that holds a GPU only while it uses it.

How the hooks get into the program: the child runs with a directory first on PYTHONPATH whose
``sitecustomize.py`` calls `bootstrap()`. Chosen over rewriting the command into
``python -m ... runpy script.py``: it works for every way of starting Python (``python x.py``,
``python -m pkg``, console scripts), the program's ``__main__``, ``sys.argv``, tracebacks and
multiprocessing behave exactly as without acb-run, and a ``sitecustomize`` the environment already
had still runs (it is chained). `bootstrap()` reads the settings from ``ACB_AUTO`` and removes
it, so processes the program starts are left alone, and installs automatic mode when the program
imports torch (an import hook), so nothing is imported that the program did not ask for.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from acb_slurm import env
from acb_slurm.exitcodes import ExitCode

#: The directory put first on the child's PYTHONPATH (holds sitecustomize.py).
BOOT_DIR = Path(__file__).with_name("autoboot")


class AutoError(RuntimeError):
    """`acb-run --auto` cannot start the program (the message says why; `exit_code` is
    acb-run's status for it)."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class AutoSpec:
    """What `acb-run --auto` was asked to run, validated."""

    command: Sequence[str]
    device: str = "cuda"
    idle_ms: float | None = None  # None: ACB_IDLE_MS, else the default
    memory_bytes: int = 0
    priority: int = 0
    label: str = ""
    stats_file: str | None = None  # where the child writes its counters at exit (JSON)


@dataclass(frozen=True)
class AutoSettings:
    """What the child reads from ACB_AUTO."""

    device: str
    idle_ms: float
    memory_bytes: int = 0
    priority: int = 0
    label: str = "auto"
    stats_file: str | None = None
    #: PYTHONPATH as it was before acb-run put the boot directory first (None: it was unset);
    #: put back before the program runs, so that its own children start as without acb-run.
    pythonpath: str | None = None


def settings_for(spec: AutoSpec, environ: Mapping[str, str]) -> AutoSettings:
    """Resolve the spec against the environment (ACB_IDLE_MS, ACB_AUTO_DEVICE)."""
    idle_ms = spec.idle_ms
    if idle_ms is None:
        raw = environ.get(env.IDLE_MS, "")
        try:
            idle_ms = float(raw) if raw else env.DEFAULT_IDLE_MS
        except ValueError:
            raise AutoError(f"{env.IDLE_MS}={raw!r} is not a number of milliseconds") from None
    if idle_ms <= 0:
        raise AutoError(f"the idle interval must be positive, got {idle_ms:g} ms")
    device = spec.device or environ.get(env.AUTO_DEVICE, "") or "cuda"
    if device.split(":", 1)[0] not in ("cuda", "cpu"):
        raise AutoError(f"--device must be cuda, cuda:N or cpu, got {device!r}")
    scripts = [arg for arg in spec.command if arg.endswith(".py")] or list(spec.command)
    label = spec.label or (os.path.basename(scripts[0]) if scripts else "auto")
    return AutoSettings(
        device=device,
        idle_ms=idle_ms,
        memory_bytes=spec.memory_bytes,
        priority=spec.priority,
        label=label,
        stats_file=spec.stats_file,
    )


def child_environment(spec: AutoSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of the program: the boot directory first on PYTHONPATH, ACB_AUTO set."""
    out = dict(environ)
    path = out.get("PYTHONPATH")
    settings = replace(settings_for(spec, environ), pythonpath=path)
    out["PYTHONPATH"] = str(BOOT_DIR) + (os.pathsep + path if path else "")
    out[env.AUTO] = json.dumps(asdict(settings))
    # torch.cuda.is_available()/device_count() without initialising CUDA: the GPU is chosen
    # at the first grant, and CUDA reads CUDA_VISIBLE_DEVICES only when it initialises.
    out.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return out


def run_auto(spec: AutoSpec, environ: Mapping[str, str] | None = None) -> NoReturn:
    """Become `spec.command` in automatic mode (exec in place; returns only by raising).

    No parent stays behind: the program holds its own session with the assigner (its lease dies
    with it), so there is nothing to forward signals to or to outlive. Its pid, exit status,
    signals and process group are the ones `acb-run` had, and start-up pays for no second
    process (measured: benchmarks/auto_startup_bench.py)."""
    if not spec.command:
        raise AutoError(
            "no command to run: put it after `--`, e.g. acb-run --auto -- python train.py"
        )
    base = os.environ if environ is None else environ
    try:  # fail here, with the message, rather than inside the program
        env.assigner_target(dict(base))
    except env.ConfigurationError as exc:
        raise AutoError(str(exc), ExitCode.ASSIGNER_UNAVAILABLE) from None
    child_env = child_environment(spec, base)
    name = spec.command[0]
    program = name if os.sep in name else shutil.which(name, path=child_env.get("PATH"))
    if program is None:
        raise AutoError(
            f"cannot start {spec.command[0]!r}: command not found", ExitCode.CANNOT_START
        )
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(program, list(spec.command), child_env)
    except OSError as exc:
        raise AutoError(
            f"cannot start {spec.command[0]!r}: {exc.strerror or exc}", ExitCode.CANNOT_START
        ) from None


# ---- in the child ------------------------------------------------------------------------------


def bootstrap() -> None:
    """Called by the boot sitecustomize: install automatic mode when torch is imported."""
    raw = os.environ.pop(env.AUTO, None)
    _chain_sitecustomize()
    if raw is None:
        return
    settings = AutoSettings(**json.loads(raw))
    # The program sees the environment and the path it would have without acb-run, and the
    # Pythons it starts do not load the boot directory (40 ms each for nothing).
    if settings.pythonpath is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = settings.pythonpath
    boot = os.path.realpath(BOOT_DIR)
    sys.path[:] = [p for p in sys.path if not p or os.path.realpath(p) != boot]
    # Registered before the program runs, so it runs after every exit handler of the program
    # (atexit is last in, first out), whenever they were registered: they find their tensors.
    atexit.register(_at_exit, settings)
    if "torch" in sys.modules:
        _install(settings)
    else:
        sys.meta_path.insert(0, _TorchImportHook(settings))


def _chain_sitecustomize() -> None:
    """Run the sitecustomize that the boot directory shadows, if the environment has one."""
    path = [p for p in sys.path if Path(p or ".").resolve() != BOOT_DIR.resolve()]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


class _TorchImportHook(importlib.abc.MetaPathFinder):
    """Installs automatic mode right after `import torch` completes, then steps aside."""

    def __init__(self, settings: AutoSettings):
        self.settings = settings

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader, settings = spec.loader, self.settings

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
                return loader.create_module(spec)

            def exec_module(self, module: ModuleType) -> None:
                module.__loader__ = loader  # torch sees its own loader, as without acb-run
                if module.__spec__ is not None:
                    module.__spec__.loader = loader
                loader.exec_module(module)
                _install(settings)

        spec.loader = _Loader()
        return spec


def _install(settings: AutoSettings) -> None:
    from acb_slurm.client import Client
    from acb_slurm.swap.auto import AutoSwap
    from acb_slurm.swap.lessors import ClientLessor

    # Our own logger only: the program's logging configuration stays its own.
    logger = logging.getLogger("acb_slurm")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("acb-auto %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get(env.AUTO_LOG_LEVEL, "WARNING").upper())
    logger.propagate = False
    lessor = ClientLessor(
        Client(),
        memory_bytes=settings.memory_bytes,
        priority=settings.priority,
        label=settings.label,
    )
    auto = AutoSwap(
        lessor,
        device=settings.device,
        idle_ms=settings.idle_ms,
        allow_graph_pools=os.environ.get(env.SWAP_ALLOW_GRAPHS, "") == "1",
    )
    lessor.attach(auto)
    auto.install()
    _installed.append(auto)


#: The automatic mode installed in this process (at most one).
_installed: list[Any] = []


def _at_exit(settings: AutoSettings) -> None:
    """After the program's exit handlers: stop the watchdog, end the session (a lease still
    held is freed with it; a stream left open at interpreter teardown can deadlock grpc), write
    the counters. The hooks stay for module teardown (see `AutoSwap.shutdown`)."""
    if not _installed:
        return
    auto = _installed[0]
    auto.shutdown()
    auto.lessor.client.close()
    logging.getLogger("acb_slurm").info("automatic mode: %s", auto.describe())
    if settings.stats_file:
        with open(settings.stats_file, "w", encoding="utf-8") as fh:
            json.dump(asdict(auto.stats), fh)
