"""`superbrain bench --smoke` runs end to end (numbers are for docs/benchmarks.md, not asserted here)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
def test_bench_smoke_prints_one_json_summary_with_no_errors(tmp_path) -> None:
    env = dict(os.environ, RAY_ADDRESS="")
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "bench", "--smoke", "--json", "--workdir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["workload"] == "W1"
    for system in ("superbrain", "grpc_limit"):
        result = summary["systems"][system]
        assert result["errors"] == 0
        assert result["rps"] > 0
        assert all(level["ok"] == level["calls"] for level in result["sweep"].values())
    assert summary["ratio_vs_limit"] > 0
    # The auth-on system's throwaway key reached the load generator, never a log.
    logs = [path for path in tmp_path.rglob("*.log") if path.is_file()]
    assert any(path.name == "superbrain.log" for path in logs)
    for path in logs:
        text = path.read_text(errors="replace")
        assert "api_key" not in text and not re.search(r"sb_[0-9a-f]{12}_", text), path


@pytest.mark.ray
def test_bench_alternate_keeps_both_systems_up_and_pairs_every_round() -> None:
    env = dict(os.environ, RAY_ADDRESS="")
    cmd = [sys.executable, "-m", "serving.cli", "bench", "--systems", "superbrain_auth_off,grpc_limit", "--alternate"]
    cmd += ["--rounds", "2", "--concurrency", "2", "--calls", "3", "--warmup", "1", "--settle-s", "0", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["alternate"] is True and summary["rounds"] == 2
    for system in ("superbrain_auth_off", "grpc_limit"):
        result = summary["systems"][system]
        assert result["errors"] == 0
        assert len(result["rounds_rps"]) == 2 and all(rps > 0 for rps in result["rounds_rps"])
    # Both systems were started once, before the first round, and stopped after the last.
    starts = [line for line in proc.stderr.splitlines() if ": starting (" in line]
    assert len(starts) == 2
    assert proc.stderr.index("round 1/2") > max(proc.stderr.index(line) for line in starts)


def test_bench_interleave_switches_one_load_between_running_systems() -> None:
    cmd = [sys.executable, "-m", "serving.cli", "bench", "--systems", "superbrain_no_ray,grpc_limit", "--interleave"]
    cmd += ["--rounds", "2", "--instances", "2", "--phase-s", "0.6", "--concurrency", "1,4", "--settle-s", "0"]
    cmd += ["--thread-cpu"]
    proc = subprocess.run([*cmd, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["interleave"] == {"phase_s": 0.6, "instances": 2} and summary["concurrency"] == [4]
    for system in ("superbrain_no_ray", "grpc_limit"):
        result = summary["systems"][system]
        assert result["errors"] == 0 and result["peak_concurrency"] == 4
        # Two fresh instances of two rounds each, pooled.
        assert len(result["rounds_rps"]) == 4 and all(rps > 0 for rps in result["rounds_rps"])
        assert len(result["instances_rps"]) == 2
        # --thread-cpu: the threads that served this system's turns, its own and the load generator's.
        owners = {t["owner"] for t in result["thread_cpu"]}
        assert owners == {system, "load generator"}, result["thread_cpu"]
        assert all(t["us_per_call"] > 0 and t["thread"] for t in result["thread_cpu"])
    # Each system was started once per instance.
    assert sum(1 for line in proc.stderr.splitlines() if ": starting (" in line) == 4
    # Latency at 1 robot was not measured, so no p50 ratio at 1 is claimed.
    assert "p50_ratio_at_1" not in summary


def test_a_keyed_auth_off_run_splits_the_cost_into_the_header_and_the_gate() -> None:
    """With superbrain_auth_off_key in the run, the bench reports what the header alone costs
    (keyed / off) and what the gate costs beyond it (on / keyed), each also per instance."""
    from serving.bench.runner import _instance_spread, compute_ratios

    def inst(on: float, keyed: float, off: float) -> dict:
        return {
            "superbrain": {"rps": on, "rounds_rps": [on] * 3},
            "superbrain_auth_off_key": {"rps": keyed, "rounds_rps": [keyed] * 3},
            "superbrain_auth_off": {"rps": off, "rounds_rps": [off] * 3},
        }

    ratios = compute_ratios("W1", inst(90, 96, 100), [64])
    assert ratios["ratio_vs_superbrain_auth_off"] == 0.9
    assert ratios["ratio_key_only_vs_superbrain_auth_off"] == 0.96
    assert ratios["ratio_vs_superbrain_auth_off_key"] == round(90 / 96, 3)
    spread = _instance_spread("W1", [inst(90, 96, 100), inst(94, 98, 100)], [64])
    assert spread["ratio_key_only_vs_superbrain_auth_off_per_instance"] == [0.96, 0.98]
    assert "ratio_key_only_vs_superbrain_auth_off" not in compute_ratios(
        "W1", inst(90, 96, 100) | {"superbrain_auth_off_key": {"error": "x"}}, [64]
    )


def test_pooled_instances_compare_threads_by_role_not_by_id() -> None:
    """Each instance has new thread ids; a role (name and rank by CPU within the name) is
    what stays the same, so that is what the pooled per-thread figures average over."""
    from serving.bench.threadcpu import pool_by_role

    def row(tid: int, thread: str, us: float, owner: str = "sb") -> dict:
        figures = {"us_per_call": us, "wait_us_per_call": us / 10, "off_us_per_call": 1.0, "minflt_per_call": 0.5}
        return {"owner": owner, "pid": 1, "tid": tid, "thread": thread, **figures}

    one = [row(11, "r / ray::IDLE", 400), row(12, "r / ray::IDLE", 40), row(13, "r / event_engine", 20)]
    two = [row(22, "r / ray::IDLE", 50), row(21, "r / ray::IDLE", 380), row(9, "gen / python", 200, "load generator")]
    pooled = {r["thread"]: r for r in pool_by_role([one, two])}
    assert pooled["r / ray::IDLE #1"]["us_per_call"] == 390.0  # the loop in both, whatever its id
    assert pooled["r / ray::IDLE #2"]["us_per_call"] == 45.0
    assert pooled["r / ray::IDLE #1"]["wait_us_per_call"] == 39.0
    assert pooled["r / event_engine #1"]["us_per_call"] == 10.0  # absent from one instance: counts as 0
    assert pooled["gen / python #1"]["owner"] == "load generator"
    assert [r["thread"] for r in pool_by_role([one, two])][0] == "r / ray::IDLE #1"


def test_instances_pool_rounds_pairwise_and_report_each_instance_ratio() -> None:
    """Pooled rounds keep each pair within its own instance; the per-instance ratios show their spread."""
    from serving.bench.runner import _instance_spread, _paired_ratio, _pool_instances

    def inst(on: list[float], off: list[float]) -> dict:
        return {
            "superbrain": {"rps": sorted(on)[1], "errors": 0, "rounds_rps": on},
            "superbrain_auth_off": {"rps": sorted(off)[1], "errors": 1, "rounds_rps": off},
        }

    # Instance 2's servers are 10 % faster as a whole: pairs within it still give 0.9.
    instances = [inst([90, 90, 90], [100, 100, 100]), inst([99, 99, 99], [110, 110, 110])]
    pooled = _pool_instances(["superbrain", "superbrain_auth_off"], instances)
    assert pooled["superbrain"]["rounds_rps"] == [90, 90, 90, 99, 99, 99]
    assert pooled["superbrain"]["instances_rps"] == [90, 99]
    assert pooled["superbrain_auth_off"]["errors"] == 2
    assert _paired_ratio(pooled["superbrain"], pooled["superbrain_auth_off"]) == 0.9
    spread = _instance_spread("W1", [inst([90] * 3, [100] * 3), inst([96] * 3, [100] * 3)], [64])
    assert spread["ratio_vs_superbrain_auth_off_per_instance"] == [0.9, 0.96]
    assert spread["ratio_vs_superbrain_auth_off_instance_mean"] == 0.93
    assert spread["ratio_vs_superbrain_auth_off_instance_sem"] == 0.03
    # A system failing in any instance fails the pooled result.
    failed = _pool_instances(["superbrain"], [{"superbrain": {"error": "boom"}}, inst([1] * 3, [1] * 3)])
    assert failed["superbrain"] == {"error": "boom"}


def test_interleaved_turns_alternate_and_each_system_gets_only_its_own_metadata() -> None:
    """harness.run_interleaved against two recording servers: turn order, counting, metadata routing."""
    import asyncio
    import time

    import grpc

    from serving.api import pb
    from serving.bench import harness

    reply = pb.ActResponse(timing=pb.ServerTiming(batch_size=1))
    reply.actions.shape.extend([1, 1])
    reply.actions.data = b"\0\0\0\0"
    seen: dict[str, list[tuple[float, tuple]]] = {"a": [], "b": []}

    def server_for(name: str) -> grpc.aio.Server:
        async def act(request: bytes, context) -> bytes:
            metadata = tuple((k, v) for k, v in context.invocation_metadata() if k in ("authorization", "x-who"))
            seen[name].append((time.perf_counter(), metadata))
            await asyncio.sleep(0.002)
            return reply.SerializeToString()

        handler = grpc.unary_unary_rpc_method_handler(act)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("superbrain.v1.PolicyService", {"Act": handler}),)
        )
        return server

    async def scenario() -> dict:
        servers = {name: server_for(name) for name in seen}
        ports = {name: s.add_insecure_port("127.0.0.1:0") for name, s in servers.items()}
        for s in servers.values():
            await s.start()
        try:
            targets = [
                {"name": "a", "target": f"127.0.0.1:{ports['a']}", "metadata": [["authorization", "Bearer k-a"]]},
                {"name": "b", "target": f"127.0.0.1:{ports['b']}", "metadata": [["x-who", "b"]]},
            ]
            return await harness.run_interleaved(targets, "W1", 3, phase_s=0.3, cycles=4, settle_s=0.05)
        finally:
            for s in servers.values():
                await s.stop(0)

    report = asyncio.run(scenario())
    assert {md for _, md in seen["a"]} == {(("authorization", "Bearer k-a"),)}
    assert {md for _, md in seen["b"]} == {(("x-who", "b"),)}
    for name in ("a", "b"):
        turns = report["systems"][name]["rounds"]
        assert len(turns) == 4
        assert all(t["errors"] == 0 and t["ok"] > 0 and t["rps"] > 0 for t in turns)
        # Counted calls come from the counted part of a turn only, never the whole run.
        assert sum(t["ok"] for t in turns) < len(seen[name])
    # Turns: a warm-up turn each, then a b | b a | a b | b a: calls to a and b come in runs, not mixed.
    calls = sorted([(t, "a") for t, _ in seen["a"]] + [(t, "b") for t, _ in seen["b"]])
    switches = sum(1 for (_, x), (_, y) in zip(calls, calls[1:], strict=False) if x != y)
    assert switches < 60  # 9 turn boundaries; a few calls in flight straddle each


def test_thread_cpu_divides_each_threads_counters_by_the_calls_of_its_systems_turns() -> None:
    from serving.bench.threadcpu import LOAD_GENERATOR, Sample, ThreadCpu, snapshot

    a, gen = ("a", 10, 11), (LOAD_GENERATOR, 20, 21)
    ms = 1_000_000
    cpu = ThreadCpu()
    # Two turns of system "a", 1 s each: 100 calls, then 300. Its thread ran 20 + 60 ms,
    # waited for a core 4 + 0 ms and faulted 3 + 1 times.
    before1 = {a: (Sample(50 * ms, 0, 7, 0), "x / loop"), gen: (Sample(0, 0, 0, 0), "g")}
    after1 = {a: (Sample(70 * ms, 4 * ms, 10, 0), "x / loop"), gen: (Sample(40 * ms, 0, 0, 0), "g")}
    after2 = {a: (Sample(130 * ms, 4 * ms, 11, 0), "x / loop"), gen: (Sample(40 * ms, 0, 0, 0), "g")}
    cpu.add_turn("a", before1, after1, 100, 1.0)
    cpu.add_turn("a", after1, after2, 300, 1.0)
    rows = cpu.report(min_us=0.0)["a"]
    assert rows[0] == {
        "owner": "a",
        "pid": 10,
        "tid": 11,
        "thread": "x / loop",
        "us_per_call": 200.0,  # 80 ms / 400 calls
        "wait_us_per_call": 10.0,
        "off_us_per_call": 4790.0,  # (2 s - 80 ms - 4 ms) / 400
        "minflt_per_call": 0.01,
        "majflt_per_call": 0.0,
    }
    assert rows[1]["owner"] == LOAD_GENERATOR and rows[1]["us_per_call"] == 100.0
    # The live reader sees this process's own threads, with the thread name in the label.
    mine = snapshot({os.getpid(): "me"})
    assert ("me", os.getpid(), os.getpid()) in mine and all(label.count(" / ") >= 1 for _, label in mine.values())
    sample = mine[("me", os.getpid(), os.getpid())][0]
    assert sample.cpu_ns > 0 and sample.minflt > 0


def test_bench_refuses_interleave_with_alternate(tmp_path) -> None:
    """Conflicting options are refused before the run makes anything (its temporary directory included)."""
    cmd = [sys.executable, "-m", "serving.cli", "bench", "--systems", "superbrain_no_ray,grpc_limit"]
    env = dict(os.environ, TMPDIR=str(tmp_path))
    for extra, reason in [
        (["--interleave", "--alternate"], "pick one"),
        (["--instances", "2"], "apply to --interleave only"),
        (["--interleave", "--cpus", "0"], "SERVER:CLIENT"),
    ]:
        proc = subprocess.run([*cmd, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and reason in proc.stderr, (extra, proc.stderr[-2000:])
    assert list(tmp_path.iterdir()) == []


def test_an_instance_that_fails_to_start_is_started_once_more(monkeypatch, tmp_path) -> None:
    """A lost instance would cost the run its pooled ratio; a second failure is reported, not retried forever."""
    from serving.bench import runner

    attempts: list[tuple[list[str], Path]] = []

    def flaky(systems, workload, concurrency, workdir, *rest):
        attempts.append((systems, workdir))
        if len(attempts) == 1:
            raise RuntimeError("superbrain did not start")
        return {name: {"rps": 1.0} for name in systems}

    monkeypatch.setattr(runner, "_run_interleaved", flaky)
    pair = ["superbrain", "superbrain_auth_off"]
    assert runner._interleaved_instance(pair, "W1", 64, tmp_path) == {name: {"rps": 1.0} for name in pair}
    # The second start logs elsewhere: the first one's logs say why it failed.
    assert attempts == [(pair, tmp_path), (pair, tmp_path / "retry")]

    def broken(systems, *args):
        attempts.append((systems, args[2]))
        raise RuntimeError("port taken")

    monkeypatch.setattr(runner, "_run_interleaved", broken)
    failed = runner._interleaved_instance(["superbrain"], "W1", 64, tmp_path)
    assert len(attempts) == 4 and "port taken" in failed["superbrain"]["error"]


@pytest.mark.ray
def test_the_auth_on_system_keeps_its_ledger_and_spool_inside_the_run_directory(tmp_path, monkeypatch) -> None:
    """A system killed before it cleans up (a bench timeout) leaves nothing elsewhere in /tmp."""
    from serving.bench.systems import RunningSystem

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with RunningSystem("superbrain", "W1", tmp_path) as running:
        assert running.api_key  # auth on: a throwaway tenant exists
        states = list(tmp_path.glob("superbrain-bench-state-*"))
        assert len(states) == 1 and (states[0] / "ledger.db").is_file()
    assert not list(tmp_path.glob("superbrain-bench-state-*"))  # and a clean stop removes it


def test_gatecost_prints_each_gate_step_warm_and_with_caches_evicted(capsys) -> None:
    from serving.bench import gatecost

    assert gatecost.main(["--batches", "3", "--batch-sizes", "2", "--evict-mb", "1", "--json"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(results) == {"batch 2, warm", "batch 2, 1 MB evicted"}
    for steps in results.values():
        assert set(steps) == set(gatecost.STEPS) and all(us > 0 for us in steps.values())


def test_cpu_lists_read_as_taskset_writes_them() -> None:
    from serving.bench.systems import parse_cpus

    assert parse_cpus("1") == {1}
    assert parse_cpus("0,2-3") == {0, 2, 3}
    for bad in ("", ",", "a", "1-x"):
        with pytest.raises(ValueError):
            parse_cpus(bad)


def test_a_pinned_system_runs_all_its_processes_on_its_cpus(tmp_path) -> None:
    """--cpus SERVER:CLIENT reaches the system as CPUS_ENV; the system pins itself before it starts anything."""
    from serving.bench.systems import CPUS_ENV, RunningSystem

    cpu = max(os.sched_getaffinity(0))
    with RunningSystem("grpc_limit", "W1", tmp_path, extra_env={CPUS_ENV: str(cpu)}) as running:
        pids = running.server_pids()
        assert pids
        assert all(os.sched_getaffinity(pid) == {cpu} for pid in pids)


def test_bench_cpus_pins_the_load_generator_and_reports_the_split() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    spec = f"{cpus[-1]}:{cpus[0]}"
    cmd = [sys.executable, "-m", "serving.cli", "bench", "--systems", "superbrain_no_ray,grpc_limit", "--interleave"]
    cmd += ["--rounds", "1", "--phase-s", "0.5", "--concurrency", "2", "--settle-s", "0", "--cpus", spec, "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["cpus"] == {"server": [cpus[-1]], "client": [cpus[0]]}
    assert all(summary["systems"][name]["errors"] == 0 for name in ("superbrain_no_ray", "grpc_limit"))
    refused = subprocess.run([*cmd[:-3], "--cpus", "0", "--json"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "SERVER:CLIENT" in refused.stderr
