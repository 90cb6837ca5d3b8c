"""The ceiling for any Python receiver here: a recvfrom loop that does nothing with the data.

usage: python bench/bare_receiver.py PORT RCVBUF_BYTES
Prints "ready" once bound, and on SIGTERM "received N" and exits.
"""

import signal
import socket
import sys


def main() -> None:
    port, rcvbuf = int(sys.argv[1]), int(sys.argv[2])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), rcvbuf)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", port))
    count = 0

    def stop(*_):
        sys.stdout.write(f"received {count}\n")
        sys.stdout.flush()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    recv = sock.recvfrom
    while True:
        recv(2048)
        count += 1


if __name__ == "__main__":
    main()
