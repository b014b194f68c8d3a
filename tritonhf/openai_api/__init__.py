"""An OpenAI-compatible API in front of tritonserver: ``tritonhf openai``, or ``tritonhf serve --openai-port``.

protocol.py reads the requests and shapes the errors; triton.py talks to the
server over gRPC; app.py is the HTTP API (FastAPI). ``run`` serves it with uvicorn.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def run(url: str, host: str = "127.0.0.1", port: int = 9000, grace: float = 30.0) -> None:
    """Serve the API on ``host:port`` in front of the server's gRPC endpoint ``url`` until SIGTERM or Ctrl-C; in-flight
    requests get ``grace`` seconds to finish."""
    import uvicorn

    from .app import create_app

    logger.info("OpenAI-compatible API on http://%s:%d/v1 in front of %s", host, port, url)
    uvicorn.run(
        create_app(url),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=int(grace),
        limit_concurrency=1024,
    )
