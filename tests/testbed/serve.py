"""Serve one OpenStack WSGI application with gunicorn (runs in the services venv).

Usage: python serve.py SERVICE CONFIG_DIR BIND CERTFILE KEYFILE
CERTFILE/KEYFILE may be "-" for plain HTTP. The application is loaded in the
worker after fork, never in the master (librados and oslo threads dislike fork).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from gunicorn.app.base import BaseApplication


def fresh_request_context(app: Any) -> Any:
    """Keystone with an empty request context at the start of every request.

    Keystone validates the request's token before it makes the request's context, so the
    validation runs with the context the thread's previous request left behind, and that
    context's request-local cache answers first: the user as it was (enabled), the token
    region's id from before an invalidation. A token of a user disabled since is then
    accepted by the thread that issued it (tests/integration/test_testbed_services.py::
    test_keystone_refuses_a_disabled_users_token_on_every_thread). A context made here,
    empty, is the one the validation uses.
    """
    from oslo_context import context

    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        context.RequestContext(overwrite=True)  # the thread's current context, empty
        return app(environ, start_response)

    return wrapped


def load(service: str, config_dir: str) -> Any:
    if service == "keystone":
        os.environ["OS_KEYSTONE_CONFIG_DIR"] = config_dir
        sys.argv = ["keystone-wsgi-public"]  # keystone parses sys.argv
        from keystone.server import wsgi

        return fresh_request_context(wsgi.initialize_public_application())
    if service == "glance":
        os.environ["OS_GLANCE_CONFIG_DIR"] = config_dir
        sys.argv = ["glance-api"]
        from glance.common import wsgi_app

        return wsgi_app.init_app()
    if service == "barbican":
        # barbican reads ~/.barbican/barbican.conf at import time
        os.environ["HOME"] = config_dir
        sys.argv = ["barbican-api"]
        from paste import deploy

        return deploy.loadapp(f"config:{config_dir}/.barbican/barbican-api-paste.ini", name="main")
    raise SystemExit(f"unknown service {service}")


class Server(BaseApplication):  # type: ignore[misc]
    def __init__(self, service: str, config_dir: str, options: dict[str, Any]) -> None:
        self.service = service
        self.config_dir = config_dir
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return load(self.service, self.config_dir)


def main() -> None:
    service, config_dir, bind, certfile, keyfile = sys.argv[1:6]
    workers = int(os.environ.get("EDGEPIN_CP_WORKERS", "1"))
    threads = int(os.environ.get("EDGEPIN_CP_THREADS", "8"))
    options: dict[str, Any] = {
        "bind": bind,
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        "timeout": 600,
        # gunicorn closes a kept-alive connection after this many idle seconds; a client
        # reusing it at that moment gets an EOF (SSLEOFError through TLS). 75 s (nginx's
        # default) instead of gunicorn's 2 s: a command's pauses between requests are
        # shorter, and idle connections cost gthread workers no thread
        "keepalive": int(os.environ.get("EDGEPIN_CP_KEEPALIVE", "75")),
        "graceful_timeout": 5,
        "preload_app": False,
        "control_socket_disable": True,
        "proc_name": f"edgepin-cp-{service}",
        "accesslog": os.path.join(config_dir, "access.log"),
        "errorlog": os.path.join(config_dir, "error.log"),
        "loglevel": "info",
    }
    if certfile != "-":
        options["certfile"] = certfile
        options["keyfile"] = keyfile
    Server(service, config_dir, options).run()


if __name__ == "__main__":
    main()
