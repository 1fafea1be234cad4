"""A reward behind plain HTTP, speaking the ddpo HTTP JSON contract (docs/custom-rewards.md), with the standard library.

    python docs/examples/http-reward/server.py --port 8080

It scores how red an image is (the mean of its red channel, 0-255) and fails an item whose prompt says "skip".
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def decode(image: dict) -> np.ndarray:
    data = base64.b64decode(image["data"])
    if image["format"] == "raw":
        return np.frombuffer(data, np.uint8).reshape(image["shape"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        results = []
        for item in request["items"]:
            if "skip" in (item.get("prompt") or ""):
                results.append({"id": item["id"], "error": {"code": "INVALID_ARGUMENT", "message": "asked to skip"}})
            else:
                red = float(decode(item["image"])[..., 0].mean())
                results.append({"id": item["id"], "score": red, "info": {"verdict": "red" if red > 128 else "not red"}})
        self.reply(200, {"results": results})

    def do_GET(self) -> None:  # the health check (the endpoint's health_url option)
        self.reply(200 if self.path == "/health" else 404, {"status": "ok"})

    def reply(self, status: int, document: dict) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
