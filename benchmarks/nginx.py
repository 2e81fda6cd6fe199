"""nginx as the reference relay: the config a careful operator would write for SSE.

`proxy_buffering off` so each event is passed on as it arrives, HTTP/1.1 with keep-alive to
the upstream (no connect per request), one worker so it gets the same single core the proxy
has. Everything nginx writes (pid, logs, temp dirs) stays in the run's temp dir, and it runs
in the foreground as our child so the run can always stop it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from procs import Server

CONFIG = """\
worker_processes 1;
worker_rlimit_nofile 32768;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 16384;
    multi_accept on;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    upstream llm {{
        server 127.0.0.1:{upstream_port};
        keepalive 2048;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://llm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(path)),
        None,
    )


def nginx_version(binary: str) -> str:
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    return (result.stderr or result.stdout).strip().split("/")[-1]


def start_nginx(binary: str, work_dir: Path, port: int, upstream_port: int) -> Server:
    """nginx in front of the upstream on `port`, ready to accept."""
    work_dir.mkdir(parents=True, exist_ok=True)
    config = work_dir / "nginx.conf"
    config.write_text(CONFIG.format(dir=work_dir, port=port, upstream_port=upstream_port))
    args = [binary, "-p", str(work_dir), "-e", str(work_dir / "error.log"), "-c", str(config)]
    args += ["-g", "daemon off;"]
    server = Server("nginx", args, port, work_dir / "stdout.log", dict(os.environ))
    return server.wait_ready()
