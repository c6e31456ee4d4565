"""Retrieval benchmarks: FAISS index kinds at scale, and the web search endpoint under load.

    # index kinds: build time, memory, single/batched queries/s, recall@10 against exact search
    python bench/retrieval.py index --work bench/out/retrieval --sizes 100000 1000000 --dim 384

    # web: p50/p95/p99 latency of POST /api/search with concurrent loopback clients, per admission limit
    python bench/retrieval.py web --index idx/ --images path/to/cells --clients 20 50 --duration 20 --max-queue 8 1000

    # backbone forward pass per image: batch sizes x OpenMP wait policy (why the server does what it does)
    python bench/retrieval.py forward --model resnet18 --image-size 96 --batches 1 4 16

``index`` runs every build and every search in a fresh subprocess of this script, so each one's
peak memory (``wait4`` rusage) and timings are its own; it goes through the real code path
(``marrowlens.retrieval.index.build_index`` over an embedding store on disk, ``CellIndex.search``).
Data: ``--data clustered`` (default) draws cell-like embeddings: a mixture of 4096 overlapping
"cell states" whose centres span a 128-d subspace, each spread over its own 16-d subspace, plus
isotropic noise (SSL embeddings have a low intrinsic dimension; these parameters were chosen so
that IVF with few probes visibly loses recall, i.e. the data is not trivially separable: nearest
neighbour cosine ~0.58, 10th ~0.29, random pairs ~0); ``--data random`` is isotropic Gaussian, the
worst case for any approximate index; ``--data PATH.npy`` uses your own vectors (queries are held
out from them). Queries are new draws, not indexed vectors. Speed is reported next to exact
(flat) search measured in the same run, because the machine may be shared.

``web`` starts ``marrowlens serve`` on a free loopback port, then drives it from one asyncio
loop (httpx) with N closed-loop clients, each uploading a random image from ``--images``, for a
bounded duration after a warm-up; it reports client-side latency percentiles of the answered
searches, throughput, errors, refusals (503: over ``--max-queue`` searches in flight; the client
then waits the ``Retry-After`` seconds, as a polite client would), the server's own time per
request (``elapsed_ms``: embedding + search) and the server's RSS before and after each run, and
its peak. Several ``--max-queue`` values start one server each.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import operator
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------------ data


def clustered(
    n: int, dim: int, seed: int, states: int = 4096, centre_dims: int = 128, local_dims: int = 16
) -> np.ndarray:
    """Cell-like embeddings: a mixture of ``states`` low-rank Gaussians (see the module docstring)."""
    rng = np.random.default_rng(1234)  # the mixture itself is fixed; ``seed`` picks the draws
    span = np.linalg.qr(rng.standard_normal((dim, centre_dims)))[0]
    centres = (0.3 * rng.standard_normal((states, centre_dims)) @ span.T).astype(np.float32)
    bases = np.stack([np.linalg.qr(rng.standard_normal((dim, local_dims)))[0] for _ in range(states)]).astype(
        np.float32
    )
    draw = np.random.default_rng(seed)
    state = draw.integers(0, states, n)
    out = draw.standard_normal((n, dim), dtype=np.float32) * np.float32(0.1)
    local = draw.standard_normal((n, local_dims), dtype=np.float32)
    order = np.argsort(state, kind="stable")
    bounds = np.searchsorted(state[order], np.arange(states + 1))
    for s in range(states):
        rows = order[bounds[s] : bounds[s + 1]]
        out[rows] += centres[s] + local[rows] @ bases[s].T
    return out


def make_data(kind: str, n: int, dim: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    if kind == "clustered":
        return clustered(n, dim, seed=1), clustered(queries, dim, seed=2)
    if kind == "random":
        rng = np.random.default_rng(1)
        return rng.standard_normal((n, dim), dtype=np.float32), rng.standard_normal((queries, dim), dtype=np.float32)
    data = np.load(kind, mmap_mode="r")
    if len(data) < n + queries:
        raise SystemExit(f"{kind} holds {len(data)} vectors; need {n} + {queries} queries")
    return np.asarray(data[:n], dtype=np.float32), np.asarray(data[n : n + queries], dtype=np.float32)


def prepare(work: Path, data: str, n: int, dim: int, queries: int) -> tuple[Path, Path]:
    """An embedding store of ``n`` vectors and a query file, made once and reused."""
    import pandas as pd

    from marrowlens.embeddings import write_embeddings

    tag = Path(data).stem if data.endswith(".npy") else data
    store, qfile = work / f"store-{tag}-{n}x{dim}", work / f"queries-{tag}-{n}x{dim}.npy"
    if (store / "meta.json").is_file() and qfile.is_file():
        return store, qfile
    t0 = time.perf_counter()
    vectors, q = make_data(data, n, dim, queries)
    cells = pd.DataFrame(
        {
            "cell_id": [f"b{i:08d}" for i in range(n)],
            "path": [f"b/{i}.png" for i in range(n)],
            "patient_id": [f"P{i % 997}" for i in range(n)],
            "cell_type": None,
            "is_blast": None,
            "mutation": None,
            "domain": None,
            "split": None,
            "width": 64,
            "height": 64,
        }
    )
    model = {
        "timm_name": "bench",
        "image_size": 224,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "num_features": dim,
        "fingerprint": "bench",
        "source": "random init",
    }
    write_embeddings(store, vectors, cells, {"model": model})
    np.save(qfile, q)
    print(f"  data {tag} {n}x{dim}: made in {time.perf_counter() - t0:.0f} s", flush=True)
    return store, qfile


# ------------------------------------------------------------------------ subprocess workers


def _rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker_build(args: argparse.Namespace) -> dict:
    from marrowlens.retrieval.index import build_index

    baseline = _rss_mib()
    t0 = time.perf_counter()
    index = build_index(args.store, args.out, kind=args.kind, overrides=args.set, overwrite=True)
    seconds = time.perf_counter() - t0
    return {
        "build_s": seconds,
        "baseline_rss_mib": baseline,
        "params": index.params,
        "factory": index.meta.factory,
        "file_mib": (Path(args.out) / "index.faiss").stat().st_size / 2**20,
    }


def worker_search(args: argparse.Namespace) -> dict:
    """Single-query latency, batched throughput and recall@10, at the default and swept parameters."""
    from marrowlens.retrieval.index import index_kind, load_index

    queries = np.load(args.queries)
    before = _rss_mib()
    index = load_index(args.index)
    loaded = _rss_mib()
    truth = np.load(args.truth) if args.truth else None
    key = index_kind(index.kind).effort_param
    default = index.params.get(key) if key else None
    sweep = [default] + [
        v for v in args.sweep if key and v != default and (key != "nprobe" or v <= index.params["nlist"])
    ]
    rows = []
    for value in sweep:
        if key:
            index.params[key] = value
        index.search(queries[:20], 10)  # warm-up
        single, cpu = [], []
        for q in queries[: args.single]:
            t, c = time.perf_counter(), time.process_time()
            index.search(q[None], 10)
            single.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        t = time.perf_counter()
        _, found = index.search(queries, 10)
        batched = time.perf_counter() - t
        recall = (
            float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])) if truth is not None else None
        )
        if truth is None:
            np.save(args.save_truth, found)
        rows.append(
            {
                key or "exact": value,
                "p50_ms": 1000 * float(np.median(single)),
                "p99_ms": 1000 * float(np.percentile(single, 99)),
                "cpu_ms": 1000 * float(np.mean(cpu)),
                "single_qps": len(single) / sum(single),
                "batched_qps": len(queries) / batched,
                "recall@10": recall,
            }
        )
    return {"index_rss_mib": loaded - before, "rows": rows}


def run_worker(*argv: str) -> tuple[dict, float]:
    """Run this script as a worker; return its JSON and its peak RSS (MiB) from wait4."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE), *argv],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"worker {argv[0]} failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024


# ------------------------------------------------------------------------------------ commands


def bench_index(args: argparse.Namespace) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    for n in args.sizes:
        store, qfile = prepare(work, args.data, n, args.dim, args.queries)
        truth = qfile.with_name(qfile.stem + "-truth.npy")
        kinds = ["flat"] + [k for k in args.kinds if k != "flat"]
        for kind in kinds:
            out = work / f"idx-{store.name}-{kind}"
            sets = [s for s in args.set if s.partition("=")[0] in _keys(kind)]
            built, build_peak = run_worker(
                "_build", str(store), str(out), kind, *functools.reduce(operator.iadd, (["--set", s] for s in sets), [])
            )
            search_args = [
                "_search",
                str(out),
                str(qfile),
                "--single",
                str(args.single),
                "--sweep",
                *map(str, args.sweep),
            ]
            search_args += ["--truth", str(truth)] if kind != "flat" else ["--save-truth", str(truth)]
            searched, _ = run_worker(*search_args)
            record = {
                "n": n,
                "dim": args.dim,
                "data": args.data,
                "kind": kind,
                **built,
                "build_peak_rss_mib": build_peak,
                **searched,
                "load_average": os.getloadavg()[0],
            }
            results.append(record)
            _print_record(record)
    tag = Path(args.data).stem if args.data.endswith(".npy") else args.data
    path = work / f"results-index-{tag}-{'-'.join(map(str, args.sizes))}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


def _keys(kind: str) -> tuple[str, ...]:
    from marrowlens.retrieval.index import index_kind

    return index_kind(kind).param_keys


def _print_record(r: dict) -> None:
    print(
        f"  {r['n']:>8} {r['kind']:<6} build {r['build_s']:7.1f} s  peak RSS {r['build_peak_rss_mib']:7.0f} MiB  "
        f"index {r['file_mib']:7.0f} MiB (RSS +{r['index_rss_mib']:.0f})  {r['factory']}  load {r['load_average']:.1f}",
        flush=True,
    )
    for row in r["rows"]:
        name = next(iter(row))
        recall = "-" if row["recall@10"] is None else f"{row['recall@10']:.4f}"
        print(
            f"      {name}={row[name]}: p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms  "
            f"CPU {row['cpu_ms']:.3f} ms  single {row['single_qps']:.0f} q/s  "
            f"batched {row['batched_qps']:.0f} q/s  recall@10 {recall}",
            flush=True,
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (so contention from other programs does not count)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _reference(index: str, payloads: list[tuple[str, bytes]], k: int) -> dict:
    """The same work without HTTP, in this process: decode + embed + search of one image at a time."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as ``marrowlens serve`` does
    from marrowlens.cohort.images import decode_bytes
    from marrowlens.retrieval.search import Searcher

    searcher = Searcher.open(index)
    wall, cpu = [], []
    for name, data in payloads[:60]:
        t, c = time.perf_counter(), time.process_time()
        searcher.search_images([decode_bytes(data, Path(name).suffix)], k)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"p50_ms": 1000 * float(np.median(wall[10:])), "cpu_ms": 1000 * float(np.median(cpu[10:]))}


def _rss_of(pid: int) -> dict:
    """Resident and peak resident memory of a process, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[name].split()[0]) / 1024 for key, name in (("rss_mib", "VmRSS"), ("peak_rss_mib", "VmHWM"))}


def bench_web(args: argparse.Namespace) -> None:
    images = sorted(
        p for p in Path(args.images).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
    )
    random.Random(0).shuffle(images)
    payloads = [(p.name, p.read_bytes()) for p in images[: args.pool]]
    if not payloads:
        raise SystemExit(f"no images under {args.images}")
    info = {"machine": f"{os.cpu_count()} cores", "index": args.index, "images": len(payloads), "k": args.k, "runs": []}
    info["reference"] = _reference(args.index, payloads, args.k)
    print(
        f"  reference (no HTTP, one image at a time): p50 {info['reference']['p50_ms']:.1f} ms, "
        f"{info['reference']['cpu_ms']:.1f} ms CPU per search; load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for max_queue in args.max_queue:
        _bench_server(args, payloads, info, max_queue)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))
        print(f"wrote {args.json}")


def _bench_server(args: argparse.Namespace, payloads: list[tuple[str, bytes]], info: dict, max_queue: int) -> None:
    """One ``marrowlens serve --max-queue`` under each client count of ``args.clients``."""
    import httpx

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "marrowlens",
            "serve",
            "--index",
            args.index,
            "--port",
            str(port),
            "--max-queue",
            str(max_queue),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            raise SystemExit("the server did not start")
        for clients in args.clients:
            memory_before = _rss_of(server.pid)
            cpu_before, client_before = _cpu_seconds(server.pid), time.process_time()
            run = asyncio.run(_load(url, payloads, clients, args.duration, args.warmup, args.k))
            run["max_queue"] = max_queue
            run["server_cpu_ms_per_request"] = (
                1000 * (_cpu_seconds(server.pid) - cpu_before) / max(run["all_requests"], 1)
            )
            run["client_cpu_ms_per_request"] = (
                1000 * (time.process_time() - client_before) / max(run["all_requests"], 1)
            )
            run["rss_before_mib"], after = memory_before["rss_mib"], _rss_of(server.pid)
            run["rss_after_mib"], run["peak_rss_mib"] = after["rss_mib"], after["peak_rss_mib"]
            run["load_average"] = os.getloadavg()[0]
            info["runs"].append(run)
            print(
                f"  --max-queue {max_queue}, {clients:>3} clients x {args.duration:.0f} s: "
                f"{run['requests']} answered ({run['throughput']:.1f}/s), "
                f"503 {run['refused']}, errors {run['errors']}, "
                f"latency p50 {run['p50_ms']:.1f} p95 {run['p95_ms']:.1f} "
                f"p99 {run['p99_ms']:.1f} max {run['max_ms']:.1f} ms; server time p50 {run['server_p50_ms']:.1f} ms "
                f"p99 {run['server_p99_ms']:.1f} ms, server CPU {run['server_cpu_ms_per_request']:.1f} ms/request; "
                f"server RSS {run['rss_before_mib']:.0f} -> {run['rss_after_mib']:.0f} MiB "
                f"(peak {run['peak_rss_mib']:.0f}); "
                f"load {run['load_average']:.1f}",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(timeout=30)


def worker_forward(args: argparse.Namespace) -> dict:
    """Per-image wall and CPU time of one backbone's forward pass at several batch sizes."""
    import torch

    from marrowlens.ssl.backbones import load_backbone

    model, info = load_backbone(args.model, image_size=args.image_size)
    out = {}
    with torch.inference_mode():
        for batch in args.batches:
            x = torch.randn(batch, 3, info.image_size, info.image_size)
            model(x)
            wall, cpu = [], []
            for _ in range(max(4, 48 // batch)):
                t, c = time.perf_counter(), time.process_time()
                model(x)
                wall.append((time.perf_counter() - t) / batch)
                cpu.append((time.process_time() - c) / batch)
            out[str(batch)] = {"wall_ms": 1000 * float(np.median(wall)), "cpu_ms": 1000 * float(np.median(cpu))}
    return out


def bench_forward(args: argparse.Namespace) -> None:
    """Batching and OpenMP wait policy: why the server batches and sets OMP_WAIT_POLICY=PASSIVE."""
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    for policy in ("default", "PASSIVE"):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("OMP_WAIT_POLICY", None)
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        argv = [sys.executable, str(HERE), "_forward", args.model, str(args.image_size), *map(str, args.batches)]
        result = json.loads(
            subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        )
        for batch, row in result.items():
            print(
                f"  {args.model} @ {args.image_size} px, OMP_WAIT_POLICY={policy}, batch {batch:>3}: "
                f"{row['wall_ms']:.1f} ms wall, {row['cpu_ms']:.1f} ms CPU per image; load {os.getloadavg()[0]:.1f}",
                flush=True,
            )


async def _load(
    url: str, payloads: list[tuple[str, bytes]], clients: int, duration: float, warmup: float, k: int
) -> dict:
    import httpx

    latencies: list[float] = []
    server: list[float] = []
    errors = refused = total = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    async def client(seed: int, http: httpx.AsyncClient) -> None:
        nonlocal errors, refused, total
        rng = random.Random(seed)
        while (now := time.perf_counter()) < stop_at:
            name, data = rng.choice(payloads)
            try:
                response = await http.post(url + "/api/search", files={"image": (name, data)}, data={"k": str(k)})
                status = response.status_code
            except httpx.HTTPError:
                status = None
            done = time.perf_counter()
            total += 1
            if now >= measure_from:
                if status == 200:
                    latencies.append(done - now)
                    server.append(response.json()["elapsed_ms"])
                elif status == 503:
                    refused += 1
                else:
                    errors += 1
            if status == 503:
                await asyncio.sleep(float(response.headers.get("retry-after", 1)))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    lat = np.array(latencies) * 1000
    return {
        "clients": clients,
        "duration_s": duration,
        "requests": len(lat),
        "all_requests": total,
        "errors": errors,
        "refused": refused,
        "throughput": len(lat) / duration,
        "p50_ms": float(np.median(lat)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
        "server_p50_ms": float(np.median(server)),
        "server_p99_ms": float(np.percentile(server, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("index", help="index kinds at scale")
    p.add_argument("--work", required=True, help="folder for generated stores and indexes (several GB at 1M)")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--data", default="clustered", help="clustered | random | PATH.npy")
    p.add_argument("--kinds", nargs="*", default=["ivf", "hnsw"], help="besides flat (always run: it is the reference)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--single", type=int, default=300, help="queries timed one by one")
    p.add_argument(
        "--sweep", type=int, nargs="*", default=[16, 32, 64, 128], help="extra nprobe / efSearch values to time"
    )
    p.add_argument("--set", action="append", default=[], help="index parameter for the kinds it applies to")
    p = sub.add_parser("web", help="POST /api/search under concurrent load")
    p.add_argument("--index", required=True)
    p.add_argument("--images", required=True, help="folder of query images")
    p.add_argument("--clients", type=int, nargs="+", default=[20, 50])
    p.add_argument(
        "--max-queue", type=int, nargs="+", default=[8], help="serve's admission limit; one server per value"
    )
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--pool", type=int, default=200, help="distinct images uploaded")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--json", help="write the figures here")
    p = sub.add_parser("forward", help="backbone forward pass: batch sizes x OpenMP wait policy")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p = sub.add_parser("_forward")
    p.add_argument("model")
    p.add_argument("image_size", type=int)
    p.add_argument("batches", type=int, nargs="+")
    p = sub.add_parser("_build")
    p.add_argument("store")
    p.add_argument("out")
    p.add_argument("kind")
    p.add_argument("--set", action="append", default=[])
    p = sub.add_parser("_search")
    p.add_argument("index")
    p.add_argument("queries")
    p.add_argument("--truth")
    p.add_argument("--save-truth")
    p.add_argument("--single", type=int, default=300)
    p.add_argument("--sweep", type=int, nargs="*", default=[])
    args = parser.parse_args()
    if args.command == "index":
        bench_index(args)
    elif args.command == "web":
        bench_web(args)
    elif args.command == "forward":
        bench_forward(args)
    else:
        workers = {"_build": worker_build, "_search": worker_search, "_forward": worker_forward}
        print(json.dumps(workers[args.command](args)))


if __name__ == "__main__":
    main()
