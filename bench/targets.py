"""The servers under test and the origin: config files, command lines and URL shapes.

Every target answers the same three kinds of request, built by its ``path``:
a resize of a source to a box ``w`` x ``h`` (``h`` may be None: keep the aspect ratio)
at quality 80, where the source is a path on the local origin.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from procs import Managed, ProcessSet, free_port, http_get, wait_http

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / ".work"
RUN = WORK / "run"
NGINX_MODULE = "/usr/lib/nginx/modules/ngx_http_image_filter_module.so"
QUALITY = 80


@dataclass
class Target:
    """One server under test: how to reach it and which processes it is made of."""

    name: str
    port: int
    kind: str  # "imgproxy", "thumbor" or "nginx"
    origin_port: int
    procs: list[Managed] = field(default_factory=list)
    note: str = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def path(self, source: str, w: int | str, h: int | str | None = None) -> str:
        """The request path that resizes origin ``source`` (``/x.jpg``) to fit ``w`` x ``h``.

        ``w``/``h``/``source`` may hold the text ``{i}``, which wrk's fresh.lua replaces.
        """
        if self.kind == "imgproxy":
            src = f"http://127.0.0.1:{self.origin_port}{source}"
            # keep {i} literal through the percent-encoding of the source URL
            query = "url=" + urllib.parse.quote(src, safe="").replace("%7Bi%7D", "{i}")
            query += f"&w={w}" + (f"&h={h}" if h is not None else "") + f"&q={QUALITY}"
            return "/image?" + query
        if self.kind == "thumbor":
            box = f"fit-in/{w}x{h}" if h is not None else f"{w}x0"
            return f"/unsafe/{box}/filters:quality({QUALITY})/127.0.0.1:{self.origin_port}{source}"
        if self.kind == "nginx":
            return f"/img{source}?w={w}" + (f"&h={h}" if h is not None else "")
        raise ValueError(self.kind)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.alive()]


def _user_line() -> str:
    # As root, nginx's workers would drop to nobody and could not read the corpus or write the
    # cache under bench/.work; as anyone else the directive is ignored with a warning.
    return "user root;" if os.geteuid() == 0 else ""


def _nginx_common(prefix: Path, workers: int) -> str:
    return textwrap.dedent(f"""\
        load_module {NGINX_MODULE};
        {_user_line()}
        worker_processes {workers};
        pid {prefix}/nginx.pid;
        error_log {prefix}/error.log warn;
        events {{ worker_connections 4096; }}
        """)


def _nginx_http_common(prefix: Path) -> str:
    return textwrap.dedent(f"""\
        access_log off;
        sendfile on;
        tcp_nopush on;
        keepalive_requests 1000000;
        client_body_temp_path {prefix}/tmp/body;
        proxy_temp_path {prefix}/tmp/proxy;
        fastcgi_temp_path {prefix}/tmp/fastcgi;
        uwsgi_temp_path {prefix}/tmp/uwsgi;
        scgi_temp_path {prefix}/tmp/scgi;
        types {{ image/jpeg jpg jpeg; image/png png; image/webp webp; image/gif gif; }}
        """)


def start_origin(ps: ProcessSet, corpus: Path) -> tuple[Managed, int]:
    """nginx serving the corpus; ``/v/ANYTHING/x.jpg`` is ``/x.jpg`` under a fresh URL."""
    prefix = RUN / "origin"
    shutil.rmtree(prefix, ignore_errors=True)
    (prefix / "tmp").mkdir(parents=True)
    port = free_port()
    conf = _nginx_common(prefix, 1) + "http {\n" + textwrap.indent(
        _nginx_http_common(prefix) + textwrap.dedent(f"""\
        server {{
            listen 127.0.0.1:{port};
            root {corpus};
            location /v/ {{ rewrite ^/v/[^/]+/(.*)$ /$1 break; }}
        }}
        """), "    ") + "}\n"
    (prefix / "nginx.conf").write_text(conf)
    proc = ps.start("origin", ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                               "-g", "daemon off;"], prefix / "log.txt", prefix)
    ok, why = wait_http(f"http://127.0.0.1:{port}/corpus.json", proc, 15)
    if not ok:
        raise RuntimeError(f"origin nginx did not start: {why}\n{proc.log_tail()}")
    return proc, port


def start_nginx(ps: ProcessSet, origin_port: int, workers: int = 1) -> Target:
    """nginx: proxy_cache of results in front of image_filter, itself over a source cache."""
    prefix = RUN / "nginx"
    shutil.rmtree(prefix, ignore_errors=True)
    (prefix / "tmp").mkdir(parents=True)
    port, inner = free_port(), free_port()
    conf = _nginx_common(prefix, workers) + "http {\n" + textwrap.indent(
        _nginx_http_common(prefix) + textwrap.dedent(f"""\
        proxy_cache_path {prefix}/results levels=1:2 keys_zone=results:16m max_size=1g
                         inactive=1d use_temp_path=off;
        proxy_cache_path {prefix}/sources levels=1:2 keys_zone=sources:16m max_size=1g
                         inactive=1d use_temp_path=off;
        map $arg_w $img_w {{ "" "-"; default $arg_w; }}
        map $arg_h $img_h {{ "" "-"; default $arg_h; }}
        upstream inner {{ server 127.0.0.1:{inner}; keepalive 16; }}
        upstream origin {{ server 127.0.0.1:{origin_port}; keepalive 16; }}
        # the public face: cached results
        server {{
            listen 127.0.0.1:{port};
            location /img/ {{
                proxy_cache results;
                proxy_cache_key $request_uri;
                proxy_cache_valid 200 1d;
                proxy_cache_lock on;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_pass http://inner;
                add_header X-Cache $upstream_cache_status;
            }}
        }}
        # the resizer, reading sources through their own cache
        server {{
            listen 127.0.0.1:{inner};
            location /img/ {{
                image_filter resize $img_w $img_h;
                image_filter_jpeg_quality {QUALITY};
                image_filter_webp_quality {QUALITY};
                image_filter_buffer 64M;
                proxy_cache sources;
                proxy_cache_key $uri;
                proxy_cache_valid 200 1d;
                proxy_cache_lock on;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_pass http://origin/;
            }}
        }}
        """), "    ") + "}\n"
    (prefix / "nginx.conf").write_text(conf)
    proc = ps.start("nginx", ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                              "-g", "daemon off;"], prefix / "log.txt", prefix)
    t = Target("nginx", port, "nginx", origin_port, [proc],
               note=f"nginx image_filter + proxy_cache, worker_processes {workers}")
    ok, why = wait_http(t.base + "/", proc, 15)
    if not ok:
        raise RuntimeError(f"nginx did not start: {why}\n{proc.log_tail()}")
    return t


def start_thumbor(ps: ProcessSet, origin_port: int, threads: int = 0) -> Target:
    """thumbor 7.8, one process, file storage for sources and results."""
    prefix = RUN / "thumbor"
    shutil.rmtree(prefix, ignore_errors=True)
    prefix.mkdir(parents=True)
    port = free_port()
    conf = textwrap.dedent(f"""\
        # written by bench/targets.py
        ALLOW_UNSAFE_URL = True
        QUALITY = {QUALITY}
        STORAGE = "thumbor.storages.file_storage"
        FILE_STORAGE_ROOT_PATH = "{prefix}/storage"
        RESULT_STORAGE = "thumbor.result_storages.file_storage"
        RESULT_STORAGE_FILE_STORAGE_ROOT_PATH = "{prefix}/result_storage"
        # without this, results of /unsafe/ URLs are never stored, so nothing would be a hit
        RESULT_STORAGE_STORES_UNSAFE = True
        ENGINE_THREADPOOL_SIZE = {threads}
        HTTP_LOADER_MAX_CLIENTS = 64
        """)
    (prefix / "thumbor.conf").write_text(conf)
    exe = WORK / "thumbor-venv" / "bin" / "thumbor"
    proc = ps.start("thumbor", [str(exe), "--ip", "127.0.0.1", "--port", str(port),
                                "--conf", str(prefix / "thumbor.conf"), "--log-level", "warning"],
                    prefix / "log.txt", prefix)
    t = Target("thumbor", port, "thumbor", origin_port, [proc],
               note=f"thumbor 7.8, 1 process, ENGINE_THREADPOOL_SIZE={threads}, "
                    "file storage + file result storage")
    ok, why = wait_http(t.base + "/healthcheck", proc, 30)
    if not ok:
        raise RuntimeError(f"thumbor did not start: {why}\n{proc.log_tail()}")
    return t


def _twistd() -> str:
    return str(ROOT / ".venv" / "bin" / "twistd")


def _imgproxy_argv(role: str, http_port: int, cache: Path, extra: list[str]) -> list[str]:
    return [_twistd(), "--pidfile=", "-n", "imgproxy", "--role", role,
            "--http", f"tcp:{http_port}:interface=127.0.0.1",
            "--cache-dir", str(cache), "--allow-private-sources", *extra]


def _check_image(t: Target) -> tuple[bool, str]:
    try:
        status, headers, body = http_get(t.base + t.path("/progressive.jpg", 64), timeout=60)
    except OSError as e:
        return False, str(e)
    if status != 200 or not headers.get("content-type", "").startswith("image/"):
        return False, f"HTTP {status} {headers.get('content-type')}: {body[:200]!r}"
    return True, "ok"


def start_imgproxy(ps: ProcessSet, origin_port: int) -> Target:
    """``twistd -n imgproxy`` standalone."""
    prefix = RUN / "imgproxy"
    shutil.rmtree(prefix, ignore_errors=True)
    port = free_port()
    proc = ps.start("imgproxy", _imgproxy_argv("standalone", port, prefix / "cache", []),
                    prefix / "log.txt", prefix)
    t = Target("imgproxy", port, "imgproxy", origin_port, [proc],
               note="twistd -n imgproxy --role standalone")
    ok, why = wait_http(t.base + "/health", proc, 30)
    if ok:
        ok, why = _check_image(t)
    if not ok:
        ps.stop(proc)
        raise RuntimeError(f"imgproxy standalone is not usable: {why}\n{proc.log_tail()}")
    return t


def start_imgproxy_cluster(ps: ProcessSet, origin_port: int) -> Target:
    """One gateway and one worker, each its own ``twistd`` process, joined by gossip."""
    prefix = RUN / "imgproxy-cluster"
    shutil.rmtree(prefix, ignore_errors=True)
    wport, wgossip, gport, ggossip = free_port(), free_port(), free_port(), free_port()
    # the default (lan) membership timing, as deployed: the bench loads the worker hard, and
    # the tight "local" profile of the tests would suspect a busy worker
    common = ["--bind", "127.0.0.1", "--advertise", "127.0.0.1"]
    worker = ps.start("imgproxy-worker", _imgproxy_argv(
        "worker", wport, prefix / "worker-cache",
        [*common, "--gossip-port", str(wgossip), "--node-name", "bench-worker"]),
        prefix / "worker.log", prefix / "worker")
    gateway = ps.start("imgproxy-gateway", _imgproxy_argv(
        "gateway", gport, prefix / "gateway-cache",
        [*common, "--gossip-port", str(ggossip), "--node-name", "bench-gateway",
         "--join", f"127.0.0.1:{wgossip}"]),
        prefix / "gateway.log", prefix / "gateway")
    t = Target("imgproxy-cluster", gport, "imgproxy", origin_port, [gateway, worker],
               note="twistd -n imgproxy: 1 gateway + 1 worker")
    ok, why = wait_http(t.base + "/health", gateway, 30)
    if ok:
        ok, why = wait_http(f"http://127.0.0.1:{wport}/health", worker, 10)
    if ok:
        # the gateway needs to hear of the worker before it can route
        for _ in range(150):
            ok, why = _check_image(t)
            if ok:
                break
            time.sleep(0.2)
    if not ok:
        tails = f"gateway:\n{gateway.log_tail(6)}\nworker:\n{worker.log_tail(6)}"
        ps.stop(gateway)
        ps.stop(worker)
        raise RuntimeError(f"imgproxy cluster is not usable: {why}\n{tails}")
    return t


STARTERS = {
    "thumbor": start_thumbor,
    "nginx": start_nginx,
    "imgproxy": start_imgproxy,
    "imgproxy-cluster": start_imgproxy_cluster,
}

if __name__ == "__main__":  # a quick manual check: start one target and print its URLs
    ps = ProcessSet()
    try:
        _o, oport = start_origin(ps, WORK / "corpus")
        tgt = STARTERS[sys.argv[1]](ps, oport)
        print(tgt.base + tgt.path("/progressive.jpg", 320))
        input("enter to stop ")
    finally:
        ps.stop_all()
