"""Run every system in one invocation and write docs/benchmarks.md.

For each system and each concurrency C, runs the controller and its agent as
separate OS processes, `--runs` times (in rounds: every system and C once
per round, so that a machine whose speed drifts slows all alike), and keeps
the median run (by throughput). Peers whose server or library is missing
report "skipped".

    pip install -e '.[bench]'
    python benchmarks/run.py                      # R=10000, C=1,16,256, 3 runs
    python benchmarks/run.py --requests 3000 --systems quiccmd_api,aioquic_asyncio

Results go to benchmarks/results/latest.json and docs/benchmarks-throughput.png
(with another --output, to that file and a PNG beside it); the table for
docs/benchmarks.md is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# name -> (controller script, agent script or None, needs our cert dir, label,
#          extra controller arguments)
SYSTEMS = {
    "quiccmd_api": ("quiccmd_api.py", "quiccmd_api.py", True, "trio_quiccmd (Python API, memory store)", ()),
    "quiccmd_api_sqlite": (
        "quiccmd_api.py", "quiccmd_api.py", True, "trio_quiccmd (Python API, SQLite store)", ("--store", "sqlite"),
    ),
    "quiccmd_api_sqlite_normal": (
        "quiccmd_api.py", "quiccmd_api.py", True, "trio_quiccmd (Python API, SQLite store, sync=normal)",
        ("--store", "sqlite", "--store-sync", "normal"),
    ),
    "quiccmd_http": (
        "quiccmd_http.py", "quiccmd_api.py", True, "trio_quiccmd (HTTP, wait=true, SQLite store)", (),
    ),
    "trivial_http": ("trivial_http.py", None, False, "trivial Quart-Trio endpoint", ()),
    "aioquic_asyncio": ("peers/aioquic_asyncio.py", "peers/aioquic_asyncio.py", False, "raw aioquic (asyncio)", ()),
    "nats_reqrep": ("peers/nats_reqrep.py", "peers/nats_reqrep.py", False, "NATS request/reply", ()),
    "websockets_json": ("peers/websockets_json.py", "peers/websockets_json.py", False, "websockets JSON", ()),
    "grpc_bidi": ("peers/grpc_bidi.py", "peers/grpc_bidi.py", False, "gRPC bidi stream", ()),
}


def run_once(name: str, concurrency: int, requests: int, timeout: float) -> dict:
    controller, agent, needs_cert, _, extra = SYSTEMS[name]
    port = free_tcp_port() if name in ("websockets_json", "grpc_bidi") else free_udp_port()
    with tempfile.TemporaryDirectory() as cert_dir:
        args = [PY, str(HERE / controller), "controller", "--port", str(port),
                "--requests", str(requests), "--concurrency", str(concurrency), *extra]
        if needs_cert:
            args += ["--cert-dir", cert_dir]
        ctl = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        agent_proc = None
        try:
            if agent is not None:
                agent_args = [PY, str(HERE / agent), "agent", "--port", str(port)]
                if needs_cert:
                    cert = Path(cert_dir) / "server-cert.pem"
                    deadline = time.monotonic() + 30
                    while not cert.exists() and ctl.poll() is None and time.monotonic() < deadline:
                        time.sleep(0.05)
                    agent_args += ["--ca-file", str(cert)]
                agent_proc = subprocess.Popen(agent_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
            try:
                out, err = ctl.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                ctl.kill()
                out, err = ctl.communicate()
                return {"error": f"timed out after {timeout:.0f} s"}
        finally:
            if agent_proc is not None:
                agent_proc.terminate()
                try:
                    agent_proc.wait(10)
                except subprocess.TimeoutExpired:
                    agent_proc.kill()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": (err.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


def median_run(runs: list[dict]) -> dict:
    good = [r for r in runs if "throughput" in r and not r.get("errors")]
    if not good:
        return runs[0]
    good.sort(key=lambda r: r["throughput"])
    result = dict(good[len(good) // 2])
    result["runs"] = len(good)
    result["throughput_all"] = [round(r["throughput"]) for r in good]
    return result


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("trio", "aioquic", "hypercorn", "quart-trio", "nats-py", "websockets", "grpcio"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    try:
        found["nats-server"] = subprocess.run(
            ["nats-server", "--version"], capture_output=True, text=True, timeout=5
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        found["nats-server"] = "not found"
    return found


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "–"


def table(results: dict, concurrencies: list[int]) -> str:
    rows = ["| system | C | commands/s | vs raw aioquic | p50 ms | p99 ms | controller CPU µs/cmd | peak RSS MiB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, by_c in results.items():
        label = SYSTEMS[name][3]
        for c in concurrencies:
            r = by_c.get(str(c), {})
            if "skipped" in r or "error" in r:
                rows.append(f"| {label} | {c} | {'skipped' if 'skipped' in r else 'error'}: {r.get('skipped') or r.get('error')} | | | | | |")
                continue
            base = results.get("aioquic_asyncio", {}).get(str(c), {}).get("throughput")
            ratio = f"{r['throughput'] / base:.2f}×" if base and "throughput" in r else "–"
            rows.append(
                f"| {label} | {c} | {fmt(r.get('throughput'), ',.0f')} | {ratio} | {fmt(r.get('p50_ms'), '.2f')} | "
                f"{fmt(r.get('p99_ms'), '.2f')} | {fmt(r.get('cpu_us_per_command'), ',.0f')} | {fmt(r.get('peak_rss_mib'), '.0f')} |"
            )
    return "\n".join(rows)


def plot(results: dict, concurrencies: list[int], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, by_c in results.items():
        xs = [c for c in concurrencies if "throughput" in by_c.get(str(c), {})]
        if xs:
            ax.plot(xs, [by_c[str(c)]["throughput"] for c in xs], marker="o", label=SYSTEMS[name][3])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
    ax.set_xlabel("commands in flight (C)")
    ax.set_ylabel("completed commands per second (median of runs)")
    ax.set_title("Request/reply throughput, one agent process, loopback")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_path(output: Path) -> Path:
    """The published plot for the default results file; beside any other one."""
    if output.resolve() == (HERE / "results" / "latest.json").resolve():
        return ROOT / "docs" / "benchmarks-throughput.png"
    return output.with_suffix(".png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--concurrency", default="1,16,256")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--output", default=str(HERE / "results" / "latest.json"))
    parser.add_argument(
        "--report-only", action="store_true",
        help="run nothing: redraw the plot and print the table from --output",
    )
    parser.add_argument(
        "--update", action="store_true",
        help="keep the other systems' results from --output and re-run only --systems",
    )
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    names = [n for n in args.systems.split(",") if n]
    unknown = set(names) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")

    out = Path(args.output)
    if args.report_only:
        results = json.loads(out.read_text())["results"]
        shown = sorted({int(c) for by_c in results.values() for c in by_c})
        plot(results, shown, plot_path(out))
        print(table(results, shown))
        return
    previous = json.loads(out.read_text()) if args.update and out.exists() else None
    results: dict[str, dict] = dict(previous["results"]) if previous else {}
    # Round after round, every system and C once per round: a machine whose
    # speed drifts (shared cores) then slows every system alike, instead of
    # whichever ran during the slow minutes.
    runs: dict[tuple[str, int], list[dict]] = {(name, c): [] for name in names for c in concurrencies}
    for round_ in range(1, args.runs + 1):
        for c in concurrencies:
            for name in names:
                cell = runs[name, c]
                if cell and "skipped" in cell[-1]:
                    continue
                r = run_once(name, c, args.requests, args.timeout)
                cell.append(r)
                print(f"round {round_} {name:16} C={c:<4} " + (
                    f"{r['throughput']:9.0f}/s p50={r['p50_ms']:.2f}ms p99={r['p99_ms']:.2f}ms "
                    f"cpu={r['cpu_us_per_command']:.0f}us"
                    if "throughput" in r else json.dumps(r)), flush=True)
    for name in names:
        results[name] = dict(results.get(name, {}))
        for c in concurrencies:
            results[name][str(c)] = median_run(runs[name, c])

    if previous:
        results = {name: results[name] for name in SYSTEMS if name in results}
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "requests": args.requests,
        "runs": args.runs,
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:]),
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    shown = sorted({int(c) for by_c in results.values() for c in by_c})
    plot(results, shown, plot_path(out))
    print(table(results, shown))


if __name__ == "__main__":
    main()
