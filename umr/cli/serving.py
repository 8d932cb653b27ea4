"""`umr search`, `umr serve`, `umr keys` and `umr demo`: answering queries."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from umr.cli.args import UserError, rerank_flags, count_or_zero, float_or_zero, port_number, positive_int

# Idle OpenMP workers (torch, FAISS) and OpenBLAS workers (numpy) spin after each call and
# steal the machine's cores from the event loop and from each other; a server wants them asleep
# soon, but not between the few hundred short parallel regions of one forward, where a
# sleeping helper costs a futex wake-up each time. So GNU OpenMP spins 10,000 rounds (a fraction
# of a millisecond) before it sleeps, and other OpenMP runtimes sleep at once. With the model
# thread holding the only team (retrieval/cpu_threads.py), this against sleeping at once (PASSIVE
# alone) gave a lone query's p50 31.4 -> 24.7 ms and QPS at 8 connections 114 -> 146 over 100k
# vectors (bench/search.py's index). Set before torch, faiss or numpy is first imported.
SERVE_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000", "OPENBLAS_THREAD_TIMEOUT": "4"}


def _print_hits(hits, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"id": h.id, "score": round(h.score, 6), **({"rerank": h.details} if h.details else {}),
                           **({"cosine": round(h.cosine, 6)} if h.cosine is not None else {}),
                           **{k: v for k, v in h.doc.to_dict().items() if k != "id"}}
                          for h in hits], indent=2))
        return
    if not hits:
        print("no results")
    if any(h.cosine is not None for h in hits):
        print("scores calibrated across modalities or encoder versions (raw cosine in brackets; --no-calibration ranks "
              "by cosine)")
    for rank, h in enumerate(hits, 1):
        d = h.doc
        what = (d.text or "").replace("\n", " ")
        if len(what) > 90:
            what = what[:87] + "..."
        img = f" [{os.path.basename(d.image)}]" if d.image else ""
        raw = f" [{h.cosine:.4f}]" if h.cosine is not None else ""
        print(f"{rank:>3}. {h.score:.4f}{raw}  {d.id}  ({d.modality}){img}  {what}")


def _use_reranker(eng, a) -> None:
    if bool(a.reranker) != bool(a.rerank):
        raise UserError("re-ranking needs both --reranker DIR and --rerank K")
    if a.reranker:
        from umr.retrieval.rerank.reranker import load_reranker

        eng.use_reranker(load_reranker(a.reranker), a.rerank, a.rerank_weight)


def cmd_search(a) -> int:
    from umr.retrieval.engine import Engine, Query
    from umr.retrieval.filters import parse_filter
    from umr.retrieval.items import parse_modalities

    if not a.text and not a.image:
        raise UserError("give a query text, --image PATH, or both")
    flt = parse_filter(a.filter)
    eng = Engine.open(a.index_dir, a.encoder, mode="read")
    if not eng.store.docs.checked:
        print(f"umr: note: {a.index_dir}'s document store is too large to check before every search; "
              f"`umr index verify {a.index_dir}` checks it", file=sys.stderr)
    try:
        _use_reranker(eng, a)
        hits = eng.search([Query(a.text, a.image, a.instruction)], a.k, parse_modalities(a.modality), flt,
                          calibrated=not a.no_calibration)[0]
    finally:
        eng.close()
    _print_hits(hits, a.json)
    return 0


def _without_replicas(argv: list[str]) -> list[str]:
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok == "--replicas":
            skip = True
        elif not tok.startswith("--replicas="):
            out.append(tok)
    return out


def cmd_serve(a) -> int:
    if a.replicas > 1:
        if a.replica_name:
            raise UserError("--replicas starts its own replicas: a replica cannot start more")
        from umr.server.replicas import supervise

        try:
            return supervise(_without_replicas(a.argv), a.replicas, a.host, a.port, a.read_only)
        except OSError as e:
            raise UserError(f"cannot listen on {a.host}:{a.port}: {e.strerror or e}") from None
    import uvicorn

    from umr.retrieval.engine import Engine
    from umr.server.app import create_app, uvicorn_config
    from umr.server.settings import ServerSettings

    admin_key = os.environ.get("UMR_ADMIN_KEY")
    if a.admin_key_file:
        try:
            admin_key = open(a.admin_key_file).read().strip()
        except OSError as e:
            raise UserError(f"cannot read --admin-key-file: {e.strerror}") from None
    keys, key_file = _serve_keys(a)
    settings = ServerSettings(micro_batching=not a.no_batching, batch_max_size=a.max_batch,
                              batch_max_wait_ms=a.max_wait_ms, max_k=a.max_k, admin_key=admin_key or None,
                              keys=keys, public_read=a.public_read, checkpoint_every_rows=a.checkpoint_rows,
                              checkpoint_every_s=a.checkpoint_seconds, follow_every_s=a.follow_interval,
                              writer_url=a.writer_url, replica_name=a.replica_name, key_file=key_file)
    from umr.retrieval.cpu_threads import alone

    alone()  # loading here must not start an OpenMP team: the model thread keeps the only one
    eng = Engine.open(a.index_dir, a.encoder, mode="read" if a.read_only else "write")
    _use_reranker(eng, a)
    app = create_app(eng, settings)
    if keys or admin_key:
        access = f"{len(keys) if keys else 0} API keys from {key_file}" if keys else "the admin key only"
        print(f"access: {access}; writes need a write key, reads {'are public' if a.public_read else 'need a read key'}")
    else:
        print("access: no API key configured: anyone who can reach this port can search, add and delete "
              "(make keys with `umr keys add --scope write`)")
    # Bound only now, with the engine loaded: a replica that listened while loading would hold its
    # share of the port's new connections waiting (server/replicas.py).
    from umr.server.replicas import bind

    try:
        sockets = [bind(a.host, a.port, shared=a.reuse_port)]
        if a.private_port:
            sockets.append(bind("127.0.0.1", a.private_port, shared=True))
    except OSError as e:
        eng.close()
        raise UserError(f"cannot listen on {a.host}:{a.port}: {e.strerror or e}") from None
    print(f"serving {a.index_dir} ({eng.store.count()} documents, encoder {eng.encoder.spec}) on "
          f"http://{a.host}:{sockets[0].getsockname()[1]}  (OpenAPI docs at /docs)", flush=True)
    from umr.server.request_log import install_filter

    install_filter()  # every log line made while a request is handled carries its id
    uvicorn.Server(uvicorn_config(app, a.trusted_proxy)).run(sockets=sockets)
    st = app.state.umr
    st.engine.close()
    return 0


def _serve_keys(a):
    """The key ring `umr serve` uses: --key-file, else $UMR_KEY_FILE or the default file when it exists."""
    from umr.server.keys import KeyRing, default_key_file

    path = Path(a.key_file) if a.key_file else default_key_file()
    if not a.key_file and not path.exists():
        return None, None
    ring = KeyRing.load(path)
    return (ring if len(ring) else None), path


def cmd_keys(a) -> int:
    from umr.server.keys import add_key, default_key_file, list_keys, revoke_key

    path = Path(a.file) if a.file else default_key_file()
    if a.keys_command == "add":
        key, entry = add_key(path, a.scope, a.name)
        print(key)
        print(f"added key {entry.name!r} (scope {entry.scope}) to {path}; this is the only time the key is shown",
              file=sys.stderr)
    elif a.keys_command == "revoke":
        revoke_key(path, a.name)
        print(f"revoked key {a.name!r} in {path}; servers using this file refuse it within a second")
    else:
        entries = list_keys(path)
        for e in entries:
            print(f"{e.name}\t{e.scope}\t{time.strftime('%Y-%m-%d %H:%M', time.localtime(e.created))}")
        if not entries:
            print(f"no keys in {path}", file=sys.stderr)
    return 0


def cmd_demo(a) -> int:
    from umr.demo import run_demo

    return run_demo(a.out, a.port)


def add_search_command(sub) -> None:
    """`umr search`."""
    s = sub.add_parser("search", help="search an index from the command line")
    s.add_argument("index_dir")
    s.add_argument("text", nargs="?")
    s.add_argument("--image", help="query image path (with TEXT: an image+text query)")
    s.add_argument("--modality", help="only results of: image, text, image,text (join several with |)")
    s.add_argument("--instruction")
    s.add_argument("--filter", action="append", metavar="KEY=VALUE", help="metadata equality, repeatable; numbers and true/false are typed (year=2020), quotes keep a string (name=\"2020\")")
    s.add_argument("-k", type=positive_int, default=10)
    s.add_argument("--encoder", help="query encoder (default: the index's)")
    s.add_argument("--no-calibration", action="store_true",
                   help="rank by raw cosine even over documents of several modalities (default: calibrated scores)")
    s.add_argument("--json", action="store_true")
    rerank_flags(s)
    s.set_defaults(fn=cmd_search)


def add_serve_commands(sub) -> None:
    """`umr serve` and `umr keys`."""
    sv = sub.add_parser("serve", help="serve an index over HTTP")
    sv.add_argument("index_dir")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=port_number, default=8000)
    sv.add_argument("--encoder")
    sv.add_argument("--max-batch", type=positive_int, default=32, help="most queries per encoder forward")
    sv.add_argument("--max-wait-ms", type=float_or_zero, default=5.0,
                    help="longest wait for the clients of the last batch to come back (a lone client never waits)")
    sv.add_argument("--max-k", type=positive_int, default=1000)
    sv.add_argument("--no-batching", action="store_true")
    sv.add_argument("--admin-key-file", help="file holding the admin API key (or set UMR_ADMIN_KEY)")
    sv.add_argument("--key-file", help="API keys made by `umr keys add` (default: $UMR_KEY_FILE or "
                                       "~/.config/umr/keys.json when it exists)")
    sv.add_argument("--public-read", action="store_true", help="with keys configured, searches and reads need no key")
    sv.add_argument("--read-only", action="store_true",
                    help="serve searches only: take no write lock, write nothing, refuse adds and deletes "
                         "(beside another server or a build of the same index)")
    sv.add_argument("--checkpoint-rows", type=count_or_zero, default=10_000,
                    help="checkpoint FAISS in the background after this many added rows (0: never by count)")
    sv.add_argument("--checkpoint-seconds", type=float_or_zero, default=30.0,
                    help="... or this long after the first add since the last checkpoint (0: never by time)")
    sv.add_argument("--replicas", type=positive_int, default=1,
                    help="serving processes on the one port: the index's writer and N-1 read-only replicas that "
                         "follow it and relay writes to it (each gets cores/N threads)")
    sv.add_argument("--follow-interval", type=float_or_zero, default=0.25, metavar="SECONDS",
                    help="how often a read-only server or replica looks for the writer's commits (0: never; an index "
                         "its writer compacted is reopened before answering from it all the same)")
    sv.add_argument("--trusted-proxy", action="append", metavar="ADDRESS",
                    help="a reverse proxy's address whose X-Forwarded-For / X-Forwarded-Proto headers are believed "
                         "(repeatable; default: none, the connection's own address is the client's)")
    sv.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    sv.add_argument("--private-port", type=int, help=argparse.SUPPRESS)
    sv.add_argument("--writer-url", help=argparse.SUPPRESS)
    sv.add_argument("--replica-name", help=argparse.SUPPRESS)
    rerank_flags(sv)
    sv.set_defaults(fn=cmd_serve)

    ks = sub.add_parser("keys", help="API keys for `umr serve`, with scopes read, write, admin (only hashes are stored)")
    ksub = ks.add_subparsers(dest="keys_command", required=True)
    ka = ksub.add_parser("add", help="make a key and print it (once)")
    ka.add_argument("--scope", required=True, choices=["read", "write", "admin"])
    ka.add_argument("--name", help="a name to revoke it by (default: SCOPE-N)")
    kl = ksub.add_parser("list", help="names, scopes and dates of the keys (never the keys)")
    kr = ksub.add_parser("revoke", help="remove a key by name")
    kr.add_argument("name")
    for kp in (ka, kl, kr):
        kp.add_argument("--file", help="key file (default: $UMR_KEY_FILE or ~/.config/umr/keys.json)")
    ks.set_defaults(fn=cmd_keys, forwards=False)


def add_demo_command(sub) -> None:
    """`umr demo`."""
    d = sub.add_parser("demo", help="index the bundled sample corpus, serve it, query it over HTTP")
    d.add_argument("--out", default=None, help="index directory (default: a temporary one)")
    d.add_argument("--port", type=port_number, default=0, help="0 picks a free port")
    d.set_defaults(fn=cmd_demo)
