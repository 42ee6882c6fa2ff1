"""A stand-in ``radfm serve`` that has every upload, starts an answer and then goes away:
what a client sees when the server dies (or its machine drops off the network) mid-answer."""

import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextlib.contextmanager
def server_gone_mid_answer(events: bytes):
    """The address of a server that answers each ask with ``events`` (server-sent event lines), then drops
    the connection."""

    class GoesAway(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # "the server has this upload"
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(events)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    server = ThreadingHTTPServer(("127.0.0.1", 0), GoesAway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
