"""The quickstart web app: a stdlib-only WSGI application.

GET /            a greeting
GET /add?x=1&y=2 queues the Celery task tasks.add and answers with its task id
POST /echo       echoes the request body
"""

import json
from urllib.parse import parse_qs

from tasks import add


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/":
        return respond(start_response, "200 OK", {"hello": "from sauna-supervisor", "pid": __import__("os").getpid()})
    if path == "/add":
        query = parse_qs(environ.get("QUERY_STRING", ""))
        x = int(query.get("x", ["1"])[0])
        y = int(query.get("y", ["2"])[0])
        result = add.delay(x, y)
        return respond(start_response, "202 Accepted", {"task_id": result.id})
    if path == "/echo" and environ["REQUEST_METHOD"] == "POST":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))])
        return [body]
    return respond(start_response, "404 Not Found", {"error": "no such page", "path": path})


def respond(start_response, status, payload):
    body = json.dumps(payload).encode() + b"\n"
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
