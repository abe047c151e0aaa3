#!/usr/bin/env python3
"""Side-by-side event hub benchmark: nextgate's hub vs Nchan (nginx + libnginx-mod-nchan).

Run:  make bench-hub                     (builds release, then runs this script)
  or: benches/hub_vs_nchan.py --rounds 3 --duration 10

For each scenario and round it starts a fresh server (Nchan is restarted between runs: a
long-lived Nchan fills its shared memory with old channels' buffers), connects the same
subscribers with the same load client (benches/hub_load.rs), publishes the same timestamped
messages over HTTP at the same fixed rate, and records deliveries/s, publish-to-receive p50 and
p99, lost messages, server CPU per delivery and server memory (idle KiB per subscriber).
Servers alternate which goes first. Both run one worker (nginx worker_processes 1, nextgate
server.threads 1). Everything is on 127.0.0.1 ephemeral ports; each run is bounded by
--duration plus connect and drain time.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchlib import free_port, need, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "bench-token-0123456789abcdef"
ADMIN_KEY = "bench-admin-key-0123456789"
NCHAN_MODULE = "/usr/lib/nginx/modules/ngx_nchan_module.so"

# name, transport, channels, subscribers per channel, messages/s over all channels
SCENARIOS = {
    "ws-1x1000": ("ws", 1, 1000, 100),
    "sse-1x1000": ("sse", 1, 1000, 100),
    "ws-1x5000": ("ws", 1, 5000, 20),
    "sse-1x5000": ("sse", 1, 5000, 20),
    "ws-1000x10": ("ws", 1000, 10, 10000),
}








def start_nchan(tmp, port, buffer):
    conf = os.path.join(tmp, "nchan.conf")
    with open(conf, "w") as f:
        f.write(f"""
load_module {NCHAN_MODULE};
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {tmp}/nchan.pid;
error_log {tmp}/nchan.error.log warn;
events {{ worker_connections 19000; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    nchan_shared_memory_size 256M;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location ~ ^/pub/(.+)$ {{
            nchan_publisher;
            nchan_channel_id $1;
            nchan_message_buffer_length {buffer};
            nchan_message_timeout 1h;
        }}
        location ~ ^/sub/(.+)$ {{
            nchan_subscriber;
            nchan_channel_id $1;
        }}
    }}
}}
""")
    p = subprocess.Popen(PIN_SERVER + ["nginx", "-c", conf, "-e", "stderr"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    wait_port(port)
    return p


# `--pin`: the server on CPU 0 and the load client on CPU 1 (taskset), so neither competes with
# the other for a core.
PIN_SERVER, PIN_CLIENT = [], []


def start_nextgate(tmp, binary, ports, buffer, work_stealing=True):
    conf = os.path.join(tmp, "nextgate.toml")
    proxy, admin, events = ports
    with open(conf, "w") as f:
        f.write(f"""
[server]
threads = 1
work_stealing = {"true" if work_stealing else "false"}
state_dir = "{tmp}/state"
[listen]
proxy = "127.0.0.1:{proxy}"
admin = "127.0.0.1:{admin}"
events = "127.0.0.1:{events}"
[admin]
key = "{ADMIN_KEY}"
[health]
kind = "none"
[hub]
buffer_messages = {buffer}
max_connections = 20000
[log]
level = "warn"
""")
    p = subprocess.Popen(PIN_SERVER + [binary, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(admin)
    wait_port(events)
    req = urllib.request.Request(
        f"http://127.0.0.1:{admin}/v3/events/processes/register",
        data=f"name=bench&endpoint=http://127.0.0.1:9&token={TOKEN}".encode(),
        headers={"content-type": "application/x-www-form-urlencoded"}, method="POST")
    urllib.request.urlopen(req, timeout=5).read()
    return p


def run_load(client, server, pid, port, scenario, args, via_proxy_port=None):
    transport, channels, subs, rate = SCENARIOS[scenario]
    scheme = "ws" if transport == "ws" else "http"
    if server == "nchan":
        sub = f"{scheme}://127.0.0.1:{port}/sub/c{{ch}}"
        pub = f"http://127.0.0.1:{port}/pub/c{{ch}}"
        token = []
    else:
        sub_port = via_proxy_port or port
        sub = f"{scheme}://127.0.0.1:{sub_port}/v3/events/sub/bench/c{{ch}}"
        pub = f"http://127.0.0.1:{port}/v3/events/pub/bench/c{{ch}}"
        token = ["--token", TOKEN]
    cmd = [client, "--sub", sub, "--pub", pub, "--transport", transport,
           "--channels", str(channels), "--subs", str(subs), "--rate", str(rate * args.rate_scale),
           "--duration", str(args.duration), "--msg-bytes", str(args.msg_bytes),
           "--server-pid", str(pid)] + token
    out = subprocess.run(PIN_CLIENT + cmd, capture_output=True, text=True, timeout=args.duration + 240)
    if out.returncode != 0:
        raise SystemExit(f"load client failed ({server} {scenario}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def stop(p):
    p.terminate()
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10, help="seconds of publishing per run")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    ap.add_argument("--rate-scale", type=float, default=1.0, help="multiply every scenario's publish rate")
    ap.add_argument("--msg-bytes", type=int, default=64)
    ap.add_argument("--buffer", type=int, default=100, help="messages buffered per channel (both servers)")
    ap.add_argument("--via-proxy", action="store_true", help="also run nextgate with subscribers on the proxy listener")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "nextgate"))
    ap.add_argument("--client", default=os.path.join(ROOT, "target", "release", "examples", "hub_load"))
    ap.add_argument("--json", help="also write all runs here")
    ap.add_argument("--pin", action="store_true",
                    help="run the server on CPU 0 and the load client on CPU 1 (taskset)")
    ap.add_argument("--no-work-stealing", action="store_true", help="run nextgate with server.work_stealing = false")
    args = ap.parse_args()
    if args.pin:
        if os.cpu_count() < 2 or not shutil.which("taskset"):
            raise SystemExit("--pin needs 2 CPUs and taskset (util-linux)")
        PIN_SERVER[:] = ["taskset", "-c", "0"]
        PIN_CLIENT[:] = ["taskset", "-c", "1"]

    need("nginx", "nginx")
    need(NCHAN_MODULE, "libnginx-mod-nchan")
    for b in (args.binary, args.client):
        if not os.path.exists(b):
            raise SystemExit(f"{b} not found: run `cargo build --release --bin nextgate --example hub_load`")
    scenarios = [s for s in args.scenarios.split(",") if s]
    servers = ["nchan", "nextgate"] + (["nextgate-proxy"] if args.via_proxy else [])
    runs = []
    print(f"# {args.rounds} rounds x {args.duration:g}s publishing, {args.msg_bytes} B messages, 1 worker each, {os.cpu_count()} CPUs")
    print(f"{'scenario':<12} {'round':>5} {'server':<15} {'deliv/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'lost':>6} {'cpu us/deliv':>12} {'idle KiB/sub':>12}")
    for scenario in scenarios:
        for r in range(args.rounds):
            order = servers if r % 2 == 0 else list(reversed(servers))
            for server in order:
                tmp = tempfile.mkdtemp(prefix="nextgate-hubbench-")
                try:
                    if server == "nchan":
                        port = free_port()
                        p = start_nchan(tmp, port, args.buffer)
                        res = run_load(args.client, server, p.pid, port, scenario, args)
                    else:
                        ports = (free_port(), free_port(), free_port())
                        p = start_nextgate(tmp, args.binary, ports, args.buffer, not args.no_work_stealing)
                        via = ports[0] if server == "nextgate-proxy" else None
                        res = run_load(args.client, server, p.pid, ports[2], scenario, args, via)
                    stop(p)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                res.update(server=server, scenario=scenario, round=r + 1)
                runs.append(res)
                print(f"{scenario:<12} {r + 1:>5} {server:<15} {res['deliveries_per_s']:>9.0f} {res['p50_ms']:>8.2f} "
                      f"{res['p99_ms']:>8.2f} {res['lost']:>6} {res['server_cpu_us_per_delivery']:>12.3f} "
                      f"{res['idle_kib_per_subscriber']:>12.2f}", flush=True)
    print("\nmedians (ratio = nextgate / nchan)")
    print(f"{'scenario':<12} {'server':<15} {'deliv/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'lost':>6} {'cpu us/deliv':>12} {'idle KiB/sub':>12}")
    keys = ["deliveries_per_s", "p50_ms", "p99_ms", "lost", "server_cpu_us_per_delivery", "idle_kib_per_subscriber"]
    summary = {}
    for scenario in scenarios:
        for server in servers:
            rs = [x for x in runs if x["scenario"] == scenario and x["server"] == server]
            med = {k: statistics.median(x[k] for x in rs) for k in keys}
            summary[(scenario, server)] = med
            print(f"{scenario:<12} {server:<15} {med['deliveries_per_s']:>9.0f} {med['p50_ms']:>8.2f} {med['p99_ms']:>8.2f} "
                  f"{med['lost']:>6.0f} {med['server_cpu_us_per_delivery']:>12.3f} {med['idle_kib_per_subscriber']:>12.2f}")
        n, g = summary[(scenario, "nchan")], summary[(scenario, "nextgate")]
        ratio = lambda k: g[k] / n[k] if n[k] else float("nan")
        print(f"{scenario:<12} {'ratio':<15} {ratio('deliveries_per_s'):>8.2f}x {ratio('p50_ms'):>7.2f}x {ratio('p99_ms'):>7.2f}x "
              f"{'':>6} {ratio('server_cpu_us_per_delivery'):>11.2f}x {ratio('idle_kib_per_subscriber'):>11.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
