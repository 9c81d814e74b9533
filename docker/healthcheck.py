"""Container health check: this node's ``GET /health`` answers 200 on its HTTP listener.

Reads the listener from the same environment the node does (``IMGPROXY_HTTP``, else the bare
port in ``HTTP_PORT``, else 8080), so it follows a changed port without a second setting.
Standard library only: the image has no curl.
"""

import os
import re
import sys
import urllib.request


def http_port(environ: dict[str, str]) -> int:
    """The TCP port of the node's HTTP listener, from its strports description."""
    description = environ.get("IMGPROXY_HTTP") or environ.get("HTTP_PORT") or "tcp:8080"
    if description.isdigit():
        return int(description)
    match = re.search(r"(?:^tcp6?:|:port=)(\d+)", description)
    return int(match.group(1)) if match else 8080


def main() -> int:
    url = f"http://127.0.0.1:{http_port(dict(os.environ))}/health"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except Exception as e:  # any failure at all means unhealthy; say why in `docker inspect`
        print(f"{url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
