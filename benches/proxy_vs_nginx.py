#!/usr/bin/env python3
"""Side-by-side proxy benchmark: nextgate vs nginx, same backend, same worker count, wrk.

Run:  make bench-proxy            (builds release, then runs this script)
  or: benches/proxy_vs_nginx.py --rounds 5 --duration 10 --connections 100 --workers 1

Everything listens on 127.0.0.1 ephemeral ports. One nginx serves as the shared backend
(`return 200` with a small body). In front of it run (a) nginx as a reverse proxy with upstream
keepalive and (b) nextgate with one registered app; wrk drives each in alternating rounds.
Per round it records requests/s, p50/p99 latency and the proxy's CPU seconds (utime+stime of
all its processes, from /proc) per 10k requests; it prints the medians and the ratios
nextgate/nginx. Rounds alternate to share the machine's noise fairly. Each wrk run is bounded
by --duration.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchlib import free_port, need, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
ADMIN_KEY = "bench-admin-key-0123456789"








def nginx_conf(directory, name, workers, server_block):
    conf = os.path.join(directory, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes {workers};
daemon off;
pid {directory}/{name}.pid;
error_log {directory}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    {server_block}
}}
""")
    return conf


def start_nginx(conf):
    return subprocess.Popen(["nginx", "-c", conf, "-e", "stderr"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tree_pids(pid):
    """pid and all its descendants."""
    pids, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        pids += kids
        frontier += kids
    return pids


def cpu_seconds(pid):
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / CLK_TCK


def to_ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    n, unit = float(m.group(1)), m.group(2)
    return n / 1000 if unit == "us" else n * 1000 if unit == "s" else n


def run_wrk(url, args, pid):
    before = cpu_seconds(pid)
    out = subprocess.run(
        ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency", url],
        capture_output=True, text=True, timeout=args.duration + 30, check=True).stdout
    cpu = cpu_seconds(pid) - before
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    p50 = to_ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = to_ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps, "p50_ms": p50, "p99_ms": p99,
        "cpu_per_10k": cpu / total * 10_000 if total else float("nan"),
        "non2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": sock_err.group(1) if sock_err else "",
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--workers", type=int, default=1, help="proxy workers (nginx processes / nextgate threads)")
    ap.add_argument("--body", type=int, default=64, help="backend response body bytes")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "nextgate"))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--bare", action="store_true",
                    help="also run benches/bare_pingora.rs (Pingora forwarding with no filters) as the floor "
                         "under nextgate (`cargo build --release --example bare_pingora` first)")
    ap.add_argument("--no-work-stealing", action="store_true", help="run nextgate with server.work_stealing = false")
    args = ap.parse_args()

    need("nginx", "nginx")
    need("wrk", "wrk")
    if not os.path.exists(args.binary):
        raise SystemExit(f"{args.binary} not found: run `cargo build --release` first")
    bare_binary = os.path.join(ROOT, "target", "release", "examples", "bare_pingora")
    if args.bare and not os.path.exists(bare_binary):
        raise SystemExit(f"{bare_binary} not found: run `cargo build --release --example bare_pingora` first")

    tmp = tempfile.mkdtemp(prefix="nextgate-bench-")
    backend_port, nginx_port = free_port(), free_port()
    ng_proxy, ng_admin = free_port(), free_port()
    procs = []
    try:
        body = "x" * args.body
        backend = start_nginx(nginx_conf(tmp, "backend", 1, f"""
    server {{
        listen 127.0.0.1:{backend_port} reuseport backlog=4096;
        location / {{ return 200 "{body}"; }}
    }}"""))
        procs.append(backend)
        nginx = start_nginx(nginx_conf(tmp, "proxy", args.workers, f"""
    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive {max(256, args.connections * 2)};
    }}
    server {{
        listen 127.0.0.1:{nginx_port} reuseport backlog=4096;
        location /v3/bench/ {{
            proxy_pass http://backend/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
        }}
    }}"""))
        procs.append(nginx)
        conf = os.path.join(tmp, "nextgate.toml")
        with open(conf, "w") as f:
            f.write(f"""
[server]
threads = {args.workers}
work_stealing = {"false" if args.no_work_stealing else "true"}
state_dir = "{tmp}/state"
[listen]
proxy = "127.0.0.1:{ng_proxy}"
admin = "127.0.0.1:{ng_admin}"
events = "127.0.0.1:{free_port()}"
[admin]
key = "{ADMIN_KEY}"
[log]
level = "warn"
""")
        gate = subprocess.Popen([args.binary, "-c", conf], stdout=subprocess.DEVNULL,
                                stderr=open(os.path.join(tmp, "nextgate.log"), "w"))
        procs.append(gate)
        bare_port = free_port()
        if args.bare:
            bare = subprocess.Popen([bare_binary, f"127.0.0.1:{bare_port}", f"127.0.0.1:{backend_port}",
                                     str(args.workers), "false" if args.no_work_stealing else "true"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(bare)
            wait_port(bare_port)
        for p in (backend_port, nginx_port, ng_proxy, ng_admin):
            wait_port(p)
        req = urllib.request.Request(
            f"http://127.0.0.1:{ng_admin}/v3/events/processes/register",
            data=json.dumps({"name": "bench", "endpoint": f"http://127.0.0.1:{backend_port}",
                             "token": "bench-token-0123456789"}).encode(),
            headers={"content-type": "application/json"})
        urllib.request.urlopen(req, timeout=5).read()

        targets = {
            "nginx": (f"http://127.0.0.1:{nginx_port}/v3/bench/", nginx.pid),
            "nextgate": (f"http://127.0.0.1:{ng_proxy}/v3/bench/", gate.pid),
        }
        if args.bare:
            targets["bare-pingora"] = (f"http://127.0.0.1:{bare_port}/v3/bench/", bare.pid)
        for name, (url, _) in targets.items():
            with urllib.request.urlopen(url, timeout=5) as r:
                assert r.status == 200 and r.read() == body.encode(), name
            subprocess.run(["wrk", "-t1", "-c10", "-d2s", url], capture_output=True, check=True)  # warm-up

        results = {name: [] for name in targets}
        print(f"# {args.rounds} rounds x {args.duration}s, wrk -t{args.threads} -c{args.connections}, "
              f"{args.workers} proxy worker(s), {args.body} B body, {os.cpu_count()} CPUs")
        print(f"{'round':>5} {'proxy':>12} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'cpu s/10k':>10} {'errors':>7}")
        for rnd in range(args.rounds):
            order = list(targets)[rnd % len(targets):] + list(targets)[:rnd % len(targets)]
            for name in order:
                url, pid = targets[name]
                r = run_wrk(url, args, pid)
                results[name].append(r)
                print(f"{rnd + 1:>5} {name:>12} {r['rps']:>10.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                      f"{r['cpu_per_10k']:>10.3f} {r['non2xx']:>7} {r['socket_errors']}", flush=True)

        med = {n: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50_ms", "p99_ms", "cpu_per_10k")}
               for n, rs in results.items()}
        print("\nmedians")
        for n, m in med.items():
            print(f"  {n:>12}: {m['rps']:.0f} req/s, p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms, "
                  f"{m['cpu_per_10k']:.3f} CPU s per 10k requests")
        a, b = med["nextgate"], med["nginx"]
        ratios = {
            "throughput": a["rps"] / b["rps"],
            "cpu_per_request": a["cpu_per_10k"] / b["cpu_per_10k"],
            "p99": a["p99_ms"] / b["p99_ms"],
        }
        print(f"ratios nextgate/nginx: throughput {ratios['throughput']:.2f}x (goal >= 1.3), "
              f"CPU per request {ratios['cpu_per_request']:.2f}x (goal <= 0.7), p99 {ratios['p99']:.2f}x (goal <= 1.0)")
        if args.bare:
            f = med["bare-pingora"]
            ratios["bare_throughput"] = f["rps"] / b["rps"]
            ratios["bare_cpu_per_request"] = f["cpu_per_10k"] / b["cpu_per_10k"]
            ratios["nextgate_over_bare_cpu"] = a["cpu_per_10k"] / f["cpu_per_10k"]
            print(f"bare Pingora/nginx: throughput {ratios['bare_throughput']:.2f}x, CPU per request "
                  f"{ratios['bare_cpu_per_request']:.2f}x; nextgate's filters on top of bare Pingora: "
                  f"{ratios['nextgate_over_bare_cpu']:.2f}x its CPU per request")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "rounds": results, "medians": med, "ratios": ratios}, f, indent=2)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
