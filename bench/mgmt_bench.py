"""Management benchmark (not a test): network-map computation at scale and how fast a
policy change reaches connected sync streams.

    python bench/mgmt_bench.py [--peers 10000 --policies 1000] [--streams 1000] [--rounds 5] [--json]

1. Map computation: a synthetic mesh of N peers in groups of 50 (each group also has
   users) and P one-rule policies between random groups (mixed tcp/udp/ssh/all, port
   ranges, some bidirectional, some disabled). Measures, from a fresh snapshot, the
   time to compute one peer's map (including the per-snapshot index, as the first map
   after a change pays it), the time for every peer's map, and the map size.
2. Propagation: a real `meshmgmt serve` (SQLite), S registered peers holding S sync
   WebSockets (100 groups of S/100 peers, each group allowed to reach itself), then R
   policy updates through the admin API; for each, the time from sending the PUT until
   each stream has received its new map: p50/p99/max over streams.

Targets from issue 3: map computation ≤ 1 s; p99 propagation to 1 000 streams ≤ 2 s.
`--json` prints one JSON line last (read by bench/mgmt.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402

from meshmgmt.netmap import compute_map  # noqa: E402
from meshmgmt.state import GroupRecord, MeshState, PeerRecord, PolicyRecord, RuleRecord, UserRecord  # noqa: E402
from meshsshd.peerproof import prove, public_key_b64  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


# --- 1. map computation --------------------------------------------------------------------


def synthetic_state(n_peers: int, n_policies: int, seed: int = 1) -> MeshState:
    rnd = random.Random(seed)
    group_size = 50
    n_groups = max(1, n_peers // group_size)
    peers = tuple(
        PeerRecord(id=f"p{i:05d}", name=f"peer-{i:05d}", mesh_ip=f"100.{64 + i // 65536}.{(i // 256) % 256}.{i % 256}",
                   fqdn=f"peer-{i:05d}.mesh.internal", wg_public_key=base64.b64encode(rnd.randbytes(32)).decode(),
                   ssh_host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI" + "A" * 43, endpoints=(f"192.0.2.{i % 250}:51820",),
                   allow_server_ssh=i % 3 != 0, ssh_enabled=i % 5 == 0)
        for i in range(n_peers)
    )
    users = tuple(UserRecord(id=f"u{i}", email=f"user{i}@example.com") for i in range(n_groups * 2))
    groups = tuple(
        GroupRecord(id=f"g{g}", name=f"group-{g}",
                    peer_ids=frozenset(p.id for p in peers[g * group_size:(g + 1) * group_size]),
                    user_ids=frozenset({f"u{2 * g}", f"u{2 * g + 1}"}))
        for g in range(n_groups)
    )
    protocols = ["tcp", "tcp", "udp", "ssh", "all", "icmp"]
    policies = []
    for i in range(n_policies):
        proto = rnd.choice(protocols)
        ports: tuple[str, ...] = ()
        if proto in ("tcp", "udp"):
            base = rnd.randrange(1, 60000)
            ports = (str(base), f"{base + 10}-{base + 20}") if rnd.random() < 0.5 else ("22",)
        rule = RuleRecord(sources=(f"group-{rnd.randrange(n_groups)}",),
                          destinations=(f"group-{rnd.randrange(n_groups)}",), protocol=proto, ports=ports,
                          bidirectional=rnd.random() < 0.2, local_users=("localpart",) if proto == "ssh" else ())
        policies.append(PolicyRecord(id=f"pol{i}", name=f"policy-{i}", enabled=rnd.random() > 0.05, rules=(rule,)))
    return MeshState(serial=1, network="100.64.0.0/10", peers=peers, users=users, groups=groups,
                     policies=tuple(policies), issuer="https://mgmt.example",
                     jwks={"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "A" * 43, "kid": "k"}]})


def bench_compute(n_peers: int, n_policies: int, samples: int = 7) -> dict[str, Any]:
    state = synthetic_state(n_peers, n_policies)
    rnd = random.Random(2)
    first_map: list[float] = []
    for _ in range(samples):
        fresh = MeshState(**{f: getattr(state, f) for f in ("serial", "network", "peers", "users", "groups",
                                                             "policies", "issuer", "jwks")})
        pid = rnd.choice(state.peers).id
        t0 = time.perf_counter()
        compute_map(fresh, pid)
        first_map.append(time.perf_counter() - t0)
    fresh = MeshState(**{f: getattr(state, f) for f in ("serial", "network", "peers", "users", "groups", "policies",
                                                         "issuer", "jwks")})
    per_map: list[float] = []
    sizes: list[int] = []
    t_all = time.perf_counter()
    for p in fresh.peers:
        t0 = time.perf_counter()
        m = compute_map(fresh, p.id)
        per_map.append(time.perf_counter() - t0)
        if len(sizes) < 200 and m is not None:
            sizes.append(len(json.dumps(m.to_dict())))
    all_maps = time.perf_counter() - t_all
    return {
        "peers": n_peers,
        "policies": n_policies,
        "map_compute_seconds": first_map,
        "one_map_cached_index_p50_seconds": pct(per_map, 50),
        "one_map_cached_index_p99_seconds": pct(per_map, 99),
        "all_maps_seconds": all_maps,
        "map_json_bytes_p50": int(statistics.median(sizes)) if sizes else 0,
    }


# --- 2. propagation -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def bench_propagation(n_streams: int, rounds: int) -> dict[str, Any]:
    import aiohttp

    meshmgmt = shutil.which("meshmgmt") or str(Path(sys.executable).parent / "meshmgmt")
    tmp = Path(tempfile.mkdtemp(prefix="mgmt-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    subprocess.run([meshmgmt, "init", "--data-dir", str(tmp), "--admin-email", "bench@example.com"], check=True,
                   capture_output=True)
    token = (tmp / "admin.token").read_text().strip()
    log = open(tmp / "serve.log", "wb")
    proc = subprocess.Popen([meshmgmt, "serve", "--data-dir", str(tmp), "--listen", f"127.0.0.1:{port}",
                             "--network", "100.64.0.0/10", "--register-burst", "1000000", "--log-level", "info"],
                            stdout=log, stderr=subprocess.STDOUT)
    admin = {"Authorization": f"Bearer {token}"}
    n_groups = min(100, n_streams)
    try:
        for _ in range(300):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.1)
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as http:
            async def post(path: str, body: Any, headers: dict | None = None) -> Any:
                async with http.post(url + path, json=body, headers=headers or admin) as r:
                    doc = await r.json()
                    assert r.status in (200, 201), (path, r.status, doc)
                    return doc

            for g in range(n_groups):
                await post("/api/groups", {"name": f"g{g}"})
            key = (await post("/api/setup-keys", {"reusable": True}))["key"]
            t_reg = time.perf_counter()
            sem = asyncio.Semaphore(32)

            async def register(i: int) -> dict:
                async with sem:
                    wg = X25519PrivateKey.generate()
                    body = {"setup_key": key, "wg_public_key": public_key_b64(wg),
                            "hostname": f"bench-{i}", "flags": {"allow_server_ssh": True}}
                    challenge = await post("/api/peers/challenge", {"wg_public_key": body["wg_public_key"]},
                                           headers={})
                    return await post("/api/peers/register", prove(body, wg, challenge), headers={})

            peers = await asyncio.gather(*(register(i) for i in range(n_streams)))
            reg_seconds = time.perf_counter() - t_reg
            groups = (await (await http.get(url + "/api/groups", headers=admin)).json())["groups"]
            by_name = {g["name"]: g["id"] for g in groups}
            for g in range(n_groups):
                members = [p["peer_id"] for p in peers[g::n_groups]]
                async with http.put(f"{url}/api/groups/{by_name[f'g{g}']}", json={"peers": members},
                                    headers=admin) as r:
                    assert r.status == 200

            def rules(port_: int) -> list[dict]:
                return [{"sources": [f"g{g}"], "destinations": [f"g{g}"], "protocol": "tcp",
                         "ports": [str(port_)]} for g in range(n_groups)]

            policy = await post("/api/policies", {"name": "bench", "rules": rules(1000)})
            # Open every stream and wait for each one's first map.
            t_conn = time.perf_counter()
            streams = await asyncio.gather(*(http.ws_connect(
                url + "/api/peers/sync", headers={"Authorization": f"Peer {p['peer_id']}:{p['credential']}"},
                heartbeat=None, max_msg_size=0) for p in peers))
            await asyncio.gather(*(ws.receive_json() for ws in streams))
            connect_seconds = time.perf_counter() - t_conn

            all_lat: list[float] = []
            per_round: list[dict[str, float]] = []
            for r in range(rounds):
                port_ = 2000 + r
                t0 = time.perf_counter()

                async def wait_for_port(ws: Any, want: str = str(port_)) -> float:
                    while True:
                        msg = await ws.receive_json()
                        rules_ = msg.get("netmap", {}).get("firewall_rules", [])
                        if any(want in fr["ports"] for fr in rules_):
                            return time.perf_counter() - t0

                waits = [asyncio.ensure_future(wait_for_port(ws)) for ws in streams]
                async with http.put(f"{url}/api/policies/{policy['id']}", json={"rules": rules(port_)},
                                    headers=admin) as resp:
                    assert resp.status == 200
                lat = await asyncio.wait_for(asyncio.gather(*waits), 120)
                all_lat += lat
                per_round.append({"p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat)})
                await asyncio.sleep(0.5)
            await asyncio.gather(*(ws.close() for ws in streams))
            async with http.get(url + "/metrics") as resp:
                metrics = await resp.text()
            values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                      if line.startswith("meshmgmt_recompute_seconds_") and " " in line}
        return {
            "streams": n_streams,
            "rounds": rounds,
            "register_seconds": reg_seconds,
            "connect_all_streams_seconds": connect_seconds,
            "propagation_p50_seconds": pct(all_lat, 50),
            "propagation_p99_seconds": [r["p99"] for r in per_round],
            "propagation_max_seconds": max(all_lat),
            "per_round": per_round,
            "server_recompute_mean_seconds": values.get("meshmgmt_recompute_seconds_sum", 0.0)
            / max(1.0, values.get("meshmgmt_recompute_seconds_count", 0.0)),
        }
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
        log.close()
        SERVER_LOG[:] = (tmp / "serve.log").read_text(errors="replace").splitlines()
        shutil.rmtree(tmp, ignore_errors=True)


SERVER_LOG: list[str] = []


def server_recomputes(n_streams: int) -> list[dict[str, Any]]:
    """The server's own account of each recompute that reached every stream."""
    out = []
    for line in SERVER_LOG:
        if '"sync.recomputed"' in line:
            doc = json.loads(line)
            if doc.get("streams") == n_streams and doc.get("sent", 0) >= n_streams:
                out.append({k: doc[k] for k in ("serial", "sent", "load_ms", "total_ms")})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--streams", type=int, default=1_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-propagation", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON line last")
    args = ap.parse_args()

    print(f"map computation: {args.peers} peers, {args.policies} policies ...", file=sys.stderr)
    compute = bench_compute(args.peers, args.policies)
    fc = compute["map_compute_seconds"]
    print(f"  one map from a fresh snapshot (index + map): p50 {statistics.median(fc) * 1000:.0f} ms, "
          f"max {max(fc) * 1000:.0f} ms   [target ≤ 1 s]")
    print(f"  one map with the snapshot's index built: p50 {compute['one_map_cached_index_p50_seconds'] * 1000:.2f} ms,"
          f" p99 {compute['one_map_cached_index_p99_seconds'] * 1000:.2f} ms")
    print(f"  every peer's map ({args.peers}): {compute['all_maps_seconds']:.2f} s; map JSON p50 "
          f"{compute['map_json_bytes_p50']} bytes")
    doc: dict[str, Any] = {"compute": compute, "map_compute_seconds": fc}
    if not args.skip_propagation:
        print(f"propagation: {args.streams} sync streams, {args.rounds} policy changes ...", file=sys.stderr)
        prop = asyncio.run(bench_propagation(args.streams, args.rounds))
        print(f"  registered {args.streams} peers in {prop['register_seconds']:.1f} s; all streams got their "
              f"first map in {prop['connect_all_streams_seconds']:.1f} s")
        print(f"  change → every stream: p50 {prop['propagation_p50_seconds'] * 1000:.0f} ms, p99 per round "
              f"{', '.join(f'{x * 1000:.0f}' for x in prop['propagation_p99_seconds'])} ms, max "
              f"{prop['propagation_max_seconds'] * 1000:.0f} ms   [target p99 ≤ 2 s]")
        rec = server_recomputes(args.streams)
        prop["server_recomputes"] = rec
        if rec:
            print("  server side, per change reaching all streams (load snapshot / total ms): "
                  + ", ".join(f"{r['load_ms']:.0f}/{r['total_ms']:.0f}" for r in rec))
        doc.update(propagation=prop, propagation_p99_seconds=prop["propagation_p99_seconds"])
    if args.json:
        print(json.dumps(doc, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
