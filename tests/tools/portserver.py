"""A TCP server that prints the source port of every connection it accepts, then answers 'ok'."""

import contextlib
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(64)
print("listening", flush=True)
while True:
    conn, peer = srv.accept()
    print(peer[1], flush=True)
    # a minimal HTTP answer, so busybox wget can be the client too
    with contextlib.suppress(OSError):
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
    conn.close()
