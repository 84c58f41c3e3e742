"""A fleet: one bundle benched on every device of a devices.toml, one result per device.

Devices on different machines run in parallel; devices on one machine (the same ssh host on several ports, say)
run one after another, so they do not time each other's load. A device that fails is one line in its outcome and
does not stop the others.

    # devices.toml
    [devices.pi5]
    url = "ssh://pi@pi5.local"
    threads = 4

    [devices.orin]
    url = "ssh://nvidia@orin.local:2222"
    python = "/usr/bin/python3.8"
    remote_dir = "/mnt/nvme/edgepipe"
    identity = "~/.ssh/lab_ed25519"
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from edgepipe.errors import ConfigError, EdgepipeError, UsageError
from edgepipe.harness import remote, report

# devices.toml keys per device: (type, what it is)
DEVICE_KEYS = {
    "url": (str, "local, ssh://user@host[:port] or adb://serial"),
    "python": (str, "the device's Python interpreter"),
    "remote_dir": (str, "where the bundle goes on the device"),
    "known_hosts": (str, "known_hosts file for the host key check"),
    "identity": (str, "SSH private key"),
    "insecure_host_key": (bool, "skip the SSH host key check (lab devices only)"),
    "threads": (int, "runtime threads on the device"),
}


@dataclass(frozen=True)
class FleetDevice:
    """One [devices.NAME] table of devices.toml."""

    name: str
    url: str
    python: str | None = None
    remote_dir: str | None = None
    known_hosts: Path | None = None
    identity: Path | None = None
    insecure_host_key: bool = False
    threads: int | None = None

    @property
    def machine(self) -> str:
        """What decides parallelism: an ssh host (any port), an adb serial, or this machine."""
        device = remote.DeviceURL.parse(self.url)
        return {"ssh": f"ssh:{device.host}", "adb": f"adb:{device.serial}"}.get(device.scheme, "local")


@dataclass(frozen=True)
class FleetOutcome:
    """One device's part of a fleet bench: the result JSON, or the one line that says why there is none."""

    device: FleetDevice
    path: Path | None
    error: str | None
    seconds: float


def load_devices(path: Path) -> list[FleetDevice]:
    """Read devices.toml; every problem is reported at once.

    Raises:
        UsageError: The file is missing or not TOML.
        ConfigError: No devices, unknown keys, wrong types or a bad URL (each names its device and key).
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file.", hint="Pass a devices.toml with [devices.NAME] tables.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid TOML ({e}).") from None
    tables, problems, devices = data.get("devices"), [], []
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(["no [devices.NAME] tables (each with url = ...)"], str(path))
    unknown_top = sorted(set(data) - {"devices"})
    if unknown_top:
        problems.append(f"unknown top-level keys {unknown_top}; only [devices.NAME] tables are read")
    for name, table in tables.items():
        if not isinstance(table, dict):
            problems.append(f"devices.{name} is not a table")
            continue
        unknown = sorted(set(table) - set(DEVICE_KEYS))
        if unknown:
            problems.append(f"devices.{name}: unknown keys {unknown} (accepted: {', '.join(DEVICE_KEYS)})")
        for key, (kind, what) in DEVICE_KEYS.items():
            if key in table and (not isinstance(table[key], kind) or (kind is int and isinstance(table[key], bool))):
                problems.append(f"devices.{name}.{key} must be {kind.__name__} ({what}), got {table[key]!r}")
        if "url" not in table:
            problems.append(f"devices.{name} has no url ({DEVICE_KEYS['url'][1]})")
            continue
        try:
            remote.DeviceURL.parse(str(table["url"]))
        except UsageError as e:
            problems.append(f"devices.{name}.url: {e.message}")
            continue
        if problems:
            continue
        devices.append(
            FleetDevice(
                name=name,
                url=table["url"],
                python=table.get("python"),
                remote_dir=table.get("remote_dir"),
                known_hosts=_path(table.get("known_hosts"), path),
                identity=_path(table.get("identity"), path),
                insecure_host_key=table.get("insecure_host_key", False),
                threads=table.get("threads"),
            )
        )
    if problems:
        raise ConfigError(problems, str(path))
    return devices


def _path(value: str | None, devices_toml: Path) -> Path | None:
    """A path in devices.toml: ~ expanded, relative ones from the file's folder."""
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else devices_toml.parent / p


def bench_fleet(
    bundle_dir: Path,
    devices: list[FleetDevice],
    *,
    on_done: Callable[[FleetOutcome], None] | None = None,
    **options,
) -> list[FleetOutcome]:
    """Bench `bundle_dir` on every device: machines in parallel, devices of one machine one after another.

    Args:
        bundle_dir: The local bundle.
        devices: From :func:`load_devices`.
        on_done: Called with each outcome as it finishes (from a worker thread).
        options: remote.bench's keywords (runs, warmup, batch, seq, context, profile, results_dir, timeout, ...);
            a device's own threads / python / remote_dir / ssh settings win.

    Returns:
        One outcome per device, in the order of devices.toml.
    """
    groups: dict[str, list[FleetDevice]] = {}
    for device in devices:
        groups.setdefault(device.machine, []).append(device)

    def run_group(group: list[FleetDevice]) -> list[FleetOutcome]:
        outcomes = []
        for device in group:
            outcome = _bench_one(bundle_dir, device, options)
            outcomes.append(outcome)
            if on_done is not None:
                on_done(outcome)
        return outcomes

    with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="edgepipe-fleet") as pool:
        done = [o for outcomes in pool.map(run_group, groups.values()) for o in outcomes]
    order = {d.name: i for i, d in enumerate(devices)}
    return sorted(done, key=lambda o: order[o.device.name])


def _bench_one(bundle_dir: Path, device: FleetDevice, options: dict) -> FleetOutcome:
    own = {
        "threads": device.threads,
        "python": device.python,
        "remote_dir": device.remote_dir,
        "known_hosts": device.known_hosts,
        "identity_file": device.identity,
    }
    kwargs = dict(options, **{k: v for k, v in own.items() if v is not None})
    kwargs["insecure_host_key"] = device.insecure_host_key or options.get("insecure_host_key", False)
    start = time.perf_counter()
    try:
        path = remote.bench(bundle_dir, device.url, **kwargs)
        return FleetOutcome(device, path, None, time.perf_counter() - start)
    except EdgepipeError as e:
        return FleetOutcome(device, None, str(e), time.perf_counter() - start)
    except Exception as e:  # one device's surprise must not take the others down; it is still one line
        message = (str(e).strip().splitlines() or [""])[0]
        return FleetOutcome(device, None, f"{type(e).__name__}: {message}", time.perf_counter() - start)


def bench_and_print(bundle: Path, devices_file: Path, console: Console, err_console: Console, options: dict) -> bool:
    """`edgepipe bench --devices`: a line as each device finishes, then the tables; False if any device failed."""
    devices = load_devices(devices_file)
    machines = len({d.machine for d in devices})
    console.print(f"benching {bundle} on {len(devices)} devices ({machines} machines in parallel)")

    def done(outcome: FleetOutcome) -> None:
        name = escape(f"{outcome.device.name} ({outcome.device.url})")
        if outcome.error is None:
            console.print(f"[green]done[/] {name} in {outcome.seconds:.1f} s: {outcome.path}", highlight=False)
        else:
            err_console.print(f"[bold red]failed[/] {name}: {escape(outcome.error)}", highlight=False)

    outcomes = bench_fleet(bundle, devices, on_done=done, **options)
    paths = [o.path for o in outcomes if o.path is not None]
    if paths:
        results = report.load_results(paths)
        console.print(report.compare_table(results), *report.extra_tables(results))
    failed = sum(o.error is not None for o in outcomes)
    console.print(f"{len(paths)} of {len(outcomes)} devices measured" + (f", {failed} failed" if failed else ""))
    return not failed
