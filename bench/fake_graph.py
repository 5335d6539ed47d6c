"""A fake WhatsApp Graph API for the benchmark: accepts every send and answers like Meta.

Run: ``python bench/fake_graph.py --port 9001``. ``GET /stats`` answers how many sends arrived.
"""

from __future__ import annotations

import argparse
import itertools

from aiohttp import web

COUNTER = web.AppKey("counter", itertools.count)
SENT = web.AppKey("sent", list)


async def send(request: web.Request) -> web.Response:
    """``POST /{version}/{phone_number_id}/messages``: a provider id for every payload."""
    await request.read()
    number = next(request.app[COUNTER])
    request.app[SENT].append(number)
    return web.json_response(
        {"messaging_product": "whatsapp", "contacts": [], "messages": [{"id": f"wamid.OUT{number:012d}"}]}
    )


async def stats(request: web.Request) -> web.Response:
    return web.json_response({"sent": len(request.app[SENT])})


def make_app() -> web.Application:
    app = web.Application()
    app[COUNTER] = itertools.count(1)
    app[SENT] = []
    app.router.add_post("/{version}/{phone_number_id}/messages", send)
    app.router.add_get("/stats", stats)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
