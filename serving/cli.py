"""``superbrain``: serve, call, describe and benchmark from the shell."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from typing import Any

from serving.config import ServingConfig, load_config


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "host": args.host,
        "grpc_port": args.grpc_port,
        "policy": args.policy,
        "model_dir": args.model,
        "num_replicas": args.num_replicas,
        "max_batch_size": args.max_batch_size,
        "ray_address": args.ray_address,
        "accelerator": args.device,
        "metrics_port": args.metrics_port,
    }


def cmd_serve(args: argparse.Namespace) -> int:
    from serving import launcher

    cfg = load_config(args.config, _serve_overrides(args))
    print(f"starting Ray and the Superbrain app ({cfg.policy} policy, {cfg.num_replicas} replica(s))...", flush=True)
    started = time.monotonic()
    dev_key = _bootstrap_dev_tenant(cfg)
    launcher.ensure_ray(cfg.ray_address)
    # After ray.init: Ray installs its own fatal-signal handlers, and ours must win
    # so that SIGTERM drains instead of aborting.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        launcher.deploy(cfg)
        _print_ready(cfg, time.monotonic() - started, dev_key)
        while not stop.wait(0.5):
            pass
        print("\nshutting down: draining in-flight requests...", flush=True)
        launcher.undeploy(cfg)
    finally:
        launcher.shutdown()
    print("stopped.", flush=True)
    return 0


def _bootstrap_dev_tenant(cfg: ServingConfig):
    """On a fresh ledger, create the dev tenant so `make serve` + the SDK work with no setup."""
    if not cfg.auth:
        print("auth is OFF (loopback only): calls need no API key and are not metered.", flush=True)
        return None
    from serving.quota.bootstrap import ensure_dev_tenant

    return ensure_dev_tenant(cfg)


def _local_api_key(cfg: ServingConfig | None = None) -> str | None:
    """$SUPERBRAIN_API_KEY, else the dev key `superbrain serve` wrote on a fresh ledger."""
    import os

    from serving.quota.bootstrap import read_dev_key

    return os.environ.get("SUPERBRAIN_API_KEY") or read_dev_key(cfg or load_config())


def _print_ready(cfg: ServingConfig, elapsed_s: float, dev_key=None) -> None:
    from serving.client import RobotClient

    with RobotClient(cfg.address, api_key=_local_api_key(cfg) if cfg.auth else "") as robot:
        info = robot.describe()
    print(f"\nSuperbrain is listening on grpc://{cfg.address} (ready in {elapsed_s:.1f}s)")
    for model in info.models:
        print(f"  model {model.name} {model.version}")
        for e in model.embodiments:
            cams = ", ".join(c.name for c in e.cameras)
            print(
                f"    {e.name:<16} state {e.state_dim:>2}  action {e.action_dim:>2}  "
                f"chunk {e.chunk_length:>2} @ {e.control_rate_hz:g} Hz  cameras: {cams}"
            )
    print(
        "\nCall it:\n"
        f"  superbrain act --target {cfg.address} --embodiment franka_arm --instruction 'pick up the red cup'\n"
        '  python -c "from serving.client import RobotClient; '
        f"print(RobotClient('{cfg.address}').describe())\"\n"
        f"  grpcurl -plaintext {cfg.address} list          # reflection is on\n"
        + (
            f"Metrics (Prometheus): http://{cfg.metrics_bind_host}:{cfg.metrics_port}/metrics\n"
            if cfg.metrics_port
            else ""
        )
        + "Stop with Ctrl-C.",
        flush=True,
    )
    if dev_key is not None:
        if dev_key.plaintext:
            print(f"\nCreated tenant 'dev' with API key (shown once; also in {dev_key.path}, mode 0600):")
            print(f"  {dev_key.plaintext}")
        print(f"The SDK reads SUPERBRAIN_API_KEY:  export SUPERBRAIN_API_KEY=$(cat {dev_key.path})", flush=True)


def cmd_act(args: argparse.Namespace) -> int:
    import numpy as np

    from serving.client import RobotClient

    rng = np.random.default_rng(args.seed)
    with RobotClient(args.target, timeout=args.timeout, api_key=_local_api_key()) as robot:
        info = robot.describe()
        specs = {e.name: e for m in info.models for e in m.embodiments}
        if args.embodiment not in specs:
            print(f"unknown embodiment {args.embodiment!r}; served: {sorted(specs)}", file=sys.stderr)
            return 2
        spec = specs[args.embodiment]
        images = {c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8) for c in spec.cameras}
        state = rng.normal(size=spec.state_dim).astype(np.float32)
        chunk = robot.act(
            images=images,
            state=state,
            instruction=args.instruction,
            embodiment=spec.name,
            image_format=args.image_format,
        )
    if args.json:
        print(json.dumps({"model": chunk.model, "version": chunk.model_version, "actions": chunk.actions.tolist()}))
    else:
        np.set_printoptions(precision=3, suppress=True, linewidth=150)
        print(f"{chunk.model} {chunk.model_version} -> {spec.name} chunk {chunk.actions.shape}")
        print(chunk.actions)
        t = chunk.timing
        print(
            f"round trip {chunk.latency_ms:.1f} ms; server: queue {t.queue_ms:.1f} ms, compute {t.compute_ms:.1f} ms, "
            f"batch {t.batch_size}"
        )
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from serving.client import RobotClient

    with RobotClient(args.target, api_key=_local_api_key()) as robot:
        print(robot.describe())
    return 0


def cmd_export_default(args: argparse.Namespace) -> int:
    from serving.models.checkpoint import write_default_checkpoint

    write_default_checkpoint(args.out, seed=args.seed)
    print(f"wrote the default checkpoint to {args.out}")
    return 0


def cmd_exporter(args: argparse.Namespace) -> int:
    """A node's endpoint without replicas (a GPU node's accelerators, or a sidecar); it runs until stopped."""
    from serving.metrics import NodeEndpoint

    overrides = {"metrics_port": args.metrics_port, "metrics_host": args.metrics_host, "state_dir": args.state_dir}
    cfg = load_config(args.config, overrides)
    if not cfg.metrics_port:
        print("metrics_port is 0: nothing to serve", file=sys.stderr)
        return 2
    ray_url = args.ray_metrics_url
    endpoint = NodeEndpoint(
        cfg.state_path / "metrics",
        cfg.metrics_bind_host,
        cfg.metrics_port,
        ray_metrics_url=(lambda: ray_url) if ray_url else None,
    )
    endpoint.start()
    if not endpoint.holding:
        endpoint.close()
        print(
            f"{cfg.metrics_bind_host}:{cfg.metrics_port} is taken (a replica on this node serves it?)", file=sys.stderr
        )
        return 1
    print(f"serving metrics on http://{cfg.metrics_bind_host}:{cfg.metrics_port}/metrics", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    endpoint.close()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from serving.bench.runner import main as bench_main

    return bench_main(args)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print this node's accelerators and what a replica here would use; exit 1 if the configuration cannot run."""
    from serving import accel

    cfg = load_config(args.config)
    # Flags win over the config's accelerator / array_backend.
    try:
        override = accel.parse_override(args.accelerator or cfg.accelerator, args.array_backend or cfg.array_backend)
    except accel.AcceleratorError as exc:
        print(exc, file=sys.stderr)
        return 2
    report = accel.doctor_report(override)
    print(json.dumps(report, indent=2) if args.json else accel.format_report(report), flush=True)
    return 0 if report["error"] is None else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="superbrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start a local Ray cluster and the Superbrain app")
    serve.add_argument("--config", help="YAML file with ServingConfig fields (env: SUPERBRAIN_CONFIG)")
    serve.add_argument("--host", help="bind address (env SUPERBRAIN_HOST, default 127.0.0.1)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (env SUPERBRAIN_GRPC_PORT, default 9000)")
    serve.add_argument("--policy", help="'default', 'noop' or 'module:Class'")
    serve.add_argument("--model", help="checkpoint directory (safetensors + config.json)")
    serve.add_argument("--num-replicas", type=int)
    serve.add_argument("--max-batch-size", type=int)
    serve.add_argument(
        "--device", "--accelerator", help="auto (default), cpu, cuda[:N], musa[:N] or npu[:N] (superbrain doctor)"
    )
    serve.add_argument("--ray-address", help="join an existing Ray cluster (e.g. 'auto')")
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus endpoint per node (env SUPERBRAIN_METRICS_PORT, default 8080; 0: off)",
    )
    serve.set_defaults(func=cmd_serve)

    exporter = sub.add_parser(
        "exporter",
        help="serve this node's metrics endpoint by itself (accelerators, and replicas' metrics if any)",
    )
    exporter.add_argument("--config", help="YAML file with ServingConfig fields (env: SUPERBRAIN_CONFIG)")
    exporter.add_argument("--metrics-port", type=int, help="env SUPERBRAIN_METRICS_PORT, default 8080")
    exporter.add_argument("--metrics-host", help="bind address (default: the serving host, 127.0.0.1)")
    exporter.add_argument("--state-dir", help="where replicas on this node keep their state (metrics/ inside)")
    exporter.add_argument(
        "--ray-metrics-url", help="also serve this node's Ray metrics, e.g. http://127.0.0.1:8090/metrics"
    )
    exporter.set_defaults(func=cmd_exporter)

    act = sub.add_parser("act", help="send one observation (random frames and state) and print the chunk")
    act.add_argument("--target", default="127.0.0.1:9000")
    act.add_argument("--embodiment", default="franka_arm")
    act.add_argument("--instruction", default="pick up the red cup")
    act.add_argument("--image-format", choices=["raw", "jpeg", "png"], default="raw")
    act.add_argument("--timeout", type=float, default=5.0)
    act.add_argument("--seed", type=int, default=0)
    act.add_argument("--json", action="store_true")
    act.set_defaults(func=cmd_act)

    describe = sub.add_parser("describe", help="list models and embodiments")
    describe.add_argument("--target", default="127.0.0.1:9000")
    describe.set_defaults(func=cmd_describe)

    export = sub.add_parser("export-default", help="write the default model as a checkpoint directory")
    export.add_argument("--out", required=True)
    export.add_argument("--seed", type=int, default=0)
    export.set_defaults(func=cmd_export_default)

    doctor = sub.add_parser("doctor", help="show this node's accelerators and what a replica here would use")
    doctor.add_argument("--config", help="YAML file with ServingConfig fields (env: SUPERBRAIN_CONFIG)")
    doctor.add_argument("--accelerator", help="pretend the config says this: auto, cpu, cuda[:N], musa[:N], npu[:N]")
    doctor.add_argument("--array-backend", help="pretend the config says this: auto, numpy, torch, cupy")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(func=cmd_doctor)

    bench = sub.add_parser("bench", help="benchmark against the gRPC limit and Ray Serve's proxy")
    from serving.bench.runner import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    from serving.admin import add_admin_commands

    add_admin_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
