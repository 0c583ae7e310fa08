"""Locust robot fleet: each user is one robot calling ``Act`` at its control rate through the SDK.

    .venv/bin/python -m loadtest.run --robots 50 --rate-hz 10 --duration 60s   # or: make loadtest

Plain ``locust -f loadtest/locustfile.py --host 127.0.0.1:9000`` works too. Settings
come from the environment (``loadtest.run`` sets them from its flags):

    RATE_HZ        control rate of every robot (default 10): Act calls are paced, not closed-loop
    EMBODIMENTS    mix, e.g. "franka_arm:2,unitree_go2:1" (default: every served embodiment, equally)
    IMAGE_FORMAT   raw (default) or jpeg; frames are made and encoded once per robot, before its first call
    ACT_TIMEOUT_S  the SDK's per-call deadline (default 2.0)
    SDK_RETRIES    1 (default): the SDK retries UNAVAILABLE / RESOURCE_EXHAUSTED+RetryInfo like on a robot; 0: never
    WARMUP_S       seconds after the last robot is spawned before the stats are reset (default 2)
    TARGET         host:port when --host is not given (default 127.0.0.1:9000)
    SUPERBRAIN_API_KEY, else the dev key file (<state_dir>/dev-api-key), as `superbrain act` reads it

Every call is reported as ``Act/<embodiment>`` with the client-side round trip; a failure
carries the SDK's typed exception (``Unauthenticated``, ``ResourceExhausted``, ...), so
Locust's failure table groups by gRPC status.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import random
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import gevent
import gevent.lock
import grpc.experimental.gevent as grpc_gevent
import numpy as np
import psutil
from locust import User, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV
from locust.user.wait_time import constant_pacing

# gRPC's C core must hand its waits to gevent, or one blocked call stalls every robot
# of this process. It must run before any channel exists (none does at import time).
grpc_gevent.init_gevent()

# Locust puts only this file's folder on sys.path; the helpers import as ``loadtest.*``.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.fleet import (  # noqa: E402
    IMAGE_FORMATS,
    INSTRUCTIONS,
    RobotKit,
    build_kit,
    choose_mix,
    resolve_api_key,
    resolve_target,
    weighted_sequence,
)
from serving.client import EmbodimentInfo, RetryPolicy, RobotClient, SuperbrainError  # noqa: E402

log = logging.getLogger("loadtest")

EPISODE_STEPS = 300  # a new episode (id + instruction) every 30 s at 10 Hz


@dataclass(frozen=True)
class Settings:
    rate_hz: float
    embodiments: str
    image_format: str
    timeout_s: float
    sdk_retries: bool
    warmup_s: float
    meta_path: str

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        settings = cls(
            rate_hz=float(env.get("RATE_HZ", "10")),
            embodiments=env.get("EMBODIMENTS", ""),
            image_format=env.get("IMAGE_FORMAT", "raw").lower(),
            timeout_s=float(env.get("ACT_TIMEOUT_S", "2.0")),
            sdk_retries=env.get("SDK_RETRIES", "1") not in ("0", "false", "no", "off"),
            warmup_s=float(env.get("WARMUP_S", "2")),
            meta_path=env.get("LOADTEST_META", ""),
        )
        if settings.rate_hz <= 0:
            raise ValueError(f"RATE_HZ must be > 0, got {settings.rate_hz}")
        if settings.image_format not in IMAGE_FORMATS:
            raise ValueError(f"IMAGE_FORMAT must be one of {IMAGE_FORMATS}, got {settings.image_format!r}")
        return settings


SETTINGS = Settings.from_env()


class Fleet:
    """State shared by the robots of this process: one Describe, and who gets which embodiment."""

    def __init__(self) -> None:
        self._lock = gevent.lock.Semaphore()
        self._specs: dict[str, EmbodimentInfo] | None = None
        self._order = None
        self.failed = False
        self.robots = 0
        self.by_embodiment: dict[str, int] = {}
        self.image_bytes: dict[str, int] = {}

    def join(self, client: RobotClient, environment: Environment) -> EmbodimentInfo | None:
        """The embodiment of the next robot; the first robot asks the server (Describe) for everyone.

        A failed Describe (wrong key, wrong target) ends the whole run at once: it is
        reported as a ``Describe`` failure and the exit code is 1, so a capacity
        search does not spend minutes measuring nothing. Robots then get None.
        """
        with self._lock:
            if self._specs is None and not self.failed:
                self._describe(client, environment)
            if self.failed:
                return None
            name = next(self._order)
            self.robots += 1
            self.by_embodiment[name] = self.by_embodiment.get(name, 0) + 1
            return self._specs[name]

    def _describe(self, client: RobotClient, environment: Environment) -> None:
        start = time.perf_counter()
        try:
            info = client.describe(timeout=max(SETTINGS.timeout_s, 10.0))
            specs = {e.name: e for e in info.model().embodiments}
            mix = choose_mix(SETTINGS.embodiments, list(specs))
        except (SuperbrainError, ValueError) as err:
            self.failed = True
            report(environment, "Describe", start, 0, err)
            log.error("cannot start the fleet: %s", err)
            environment.process_exit_code = 1
            gevent.spawn(environment.runner.quit)
            return
        report(environment, "Describe", start, 0, None)
        self._specs = specs
        self._order = weighted_sequence(mix)
        log.info("fleet mix %s at %g Hz, %s frames", mix, SETTINGS.rate_hz, SETTINGS.image_format)


FLEET = Fleet()
API_KEY = resolve_api_key()
_VARYING = re.compile(r"\d+(\.\d+)?")


def for_stats(err: Exception) -> Exception:
    """The exception as Locust should group it: by type (hence gRPC status), numbers masked.

    Locust keys its failure table on ``repr(exception)``; ids and retry delays in the
    details would otherwise split one status into many rows.
    """
    if not isinstance(err, SuperbrainError):
        return err
    details = _VARYING.sub("#", err.details)[:200]
    if type(err) is SuperbrainError:  # a status without its own class: keep the code visible
        details = f"{err.code.name}: {details}"
    return type(err)(details, err.code)


def report(environment: Environment, name: str, start: float, length: int, error: Exception | None) -> None:
    environment.events.request.fire(
        request_type="grpc",
        name=name,
        response_time=(time.perf_counter() - start) * 1e3,
        response_length=length,
        exception=for_stats(error) if error is not None else None,
        context={},
    )


class Robot(User):
    """One robot: a connection of its own, its own frames, one Act per control tick."""

    wait_time = constant_pacing(1.0 / SETTINGS.rate_hz)

    def on_start(self) -> None:
        self.client = RobotClient(
            resolve_target(self.host),
            api_key=API_KEY or "",
            timeout=SETTINGS.timeout_s,
            retry=None if SETTINGS.sdk_retries else RetryPolicy(max_attempts=1),
        )
        self.kit: RobotKit | None = None
        spec = FLEET.join(self.client, self.environment)
        if spec is None:
            return  # the run is ending; act() stops this robot quietly
        index = FLEET.robots
        self.rng = np.random.default_rng(index)
        self.kit = build_kit(spec, self.rng, SETTINGS.image_format)
        FLEET.image_bytes[spec.name] = self.kit.image_bytes
        self.call_name = f"Act/{spec.name}"
        self.robot_id = f"loadtest-{os.getpid()}-{index}"
        self.step = 0
        self._new_episode()
        with contextlib.suppress(SuperbrainError):  # if it cannot connect, the calls will report it
            self.client.wait_ready(timeout=5.0)  # connect before the first measured call
        # Robots spawned together would tick together; real fleets are out of phase.
        gevent.sleep(random.uniform(0.0, 1.0 / SETTINGS.rate_hz))

    def on_stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    def _new_episode(self) -> None:
        self.episode_id = uuid.uuid4().hex[:12]
        self.instruction = random.choice(INSTRUCTIONS)

    @task
    def act(self) -> None:
        if self.kit is None:
            raise StopUser()
        self.step += 1
        if self.step % EPISODE_STEPS == 0:
            self._new_episode()
        state = self.kit.next_state(self.rng)
        start = time.perf_counter()
        try:
            chunk = self.client.act(
                images=self.kit.images,
                state=state,
                instruction=self.instruction,
                embodiment=self.kit.embodiment.name,
                robot_id=self.robot_id,
                episode_id=self.episode_id,
                step=self.step,
            )
        except Exception as err:  # typed SDK errors, and anything else: never drop a call from the stats
            report(self.environment, self.call_name, start, 0, err)
        else:
            report(self.environment, self.call_name, start, chunk.actions.nbytes, None)


# -- warm-up and load-generator CPU ------------------------------------------------


class _CpuMeter:
    """Samples this process's CPU once a second after the warm-up: a saturated generator
    inflates latencies by itself, and the capacity search must be able to tell."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        proc = psutil.Process()
        proc.cpu_percent(None)

        def loop() -> None:
            while True:
                gevent.sleep(1.0)
                self.samples.append(proc.cpu_percent(None))

        self._greenlet = gevent.spawn(loop)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)


CPU = _CpuMeter()
_ENV: dict[str, Environment] = {}


@events.init.add_listener
def _on_init(environment: Environment, **_kw) -> None:
    _ENV["environment"] = environment


@events.spawning_complete.add_listener
def _reset_after_warmup(user_count: int, **_kw) -> None:
    """Measure the steady state only: connections, the first batches and ramp-up are excluded."""
    env = _ENV.get("environment")

    def reset() -> None:
        if env is not None and env.runner is not None:
            env.runner.stats.reset_all()
        CPU.start()

    gevent.spawn_later(SETTINGS.warmup_s, reset)


@events.quitting.add_listener
def _final_csv(environment: Environment, **_kw) -> None:
    """Write the final stats and failures CSV now, from the final numbers.

    Locust's own CSV writer rewrites the files once a second and does not write
    again when it quits, so its files miss up to the last second (all of a run
    that fails fast). Written beside and renamed: its open handles keep writing
    to the old files.
    """
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if not prefix:
        return
    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for suffix, write in (("_stats.csv", writer.requests_csv), ("_failures.csv", writer.failures_csv)):
        path = Path(f"{prefix}{suffix}")
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            write(csv.writer(f))
        os.replace(tmp, path)


@events.quitting.add_listener
def _write_meta(environment: Environment, **_kw) -> None:
    """Facts the CSV does not hold, for ``loadtest.run``'s summary and the capacity search."""
    CPU.stop()
    if not SETTINGS.meta_path:
        return
    samples = CPU.samples
    meta = {
        "rate_hz": SETTINGS.rate_hz,
        "image_format": SETTINGS.image_format,
        "robots": FLEET.robots,
        "robots_by_embodiment": FLEET.by_embodiment,
        "image_bytes_per_call": FLEET.image_bytes,
        "generator_cpu_mean": sum(samples) / len(samples) if samples else None,
        "generator_cpu_max": max(samples) if samples else None,
        "describe_failed": FLEET.failed,
    }
    Path(SETTINGS.meta_path).write_text(json.dumps(meta, indent=1))
