#!/usr/bin/env python3
"""Bounded network probes for the VM lab (runs inside the guest, in its namespaces).

Every call ends on its own: each socket has a timeout, every loop a count and a
deadline. Exit status 0 = the thing asked about happened, 1 = it did not.
"""
import os
import socket
import ssl
import sys
import threading
import time


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tcp(host, port, source=None, timeout=2.0):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if source:
            s.bind((source, 0))
        s.connect((host, int(port)))
        return True
    except OSError:
        return False
    finally:
        s.close()


def udp_echo(host, port, timeout=2.0):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(b"vmlab", (host, int(port)))
        data, _ = s.recvfrom(64)
        return data == b"vmlab"
    except OSError:
        return False
    finally:
        s.close()


def udp_silent(host, port, wait=1.5):
    """True if a datagram to host:port draws no answer and no ICMP error."""
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.settimeout(wait)
    try:
        s.connect((host, int(port)))
        s.send(b"\x00" * 114)
        try:
            s.recv(64)
            return False  # an answer
        except socket.timeout:
            return True
        except ConnectionRefusedError:
            return False  # ICMP port unreachable
    finally:
        s.close()


def serve_tcp_echo(addr, port, tls=None):
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family(addr) == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((addr, int(port)))
    s.listen(512)
    ctx = None
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls + "/cert.pem", tls + "/key.pem")

    def handle(c):
        c.settimeout(60)
        try:
            if ctx:
                c = ctx.wrap_socket(c, server_side=True)
                c.recv(4096)
                c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\nmirror\n")
                return
            while True:
                d = c.recv(4096)
                if not d:
                    return
                if d.startswith(b"GET "):
                    c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\nmirror\n")
                    return
                c.sendall(d)
        except OSError:
            pass
        finally:
            c.close()

    deadline = time.time() + 3600
    while time.time() < deadline:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def serve_udp_echo(addr, port):
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    if family(addr) == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((addr, int(port)))
    deadline = time.time() + 3600
    while time.time() < deadline:
        d, a = s.recvfrom(512)
        s.sendto(d, a)


def intruder(host, port, seconds, flag, control_port=None, ready=None):
    """Connects to host:port again and again for `seconds` (20 ms per handshake),
    keeps what gets through, then waits for `flag` (the repair is done), one more
    second, and reports how many still carry data both ways. A control connection
    to `control_port` (one the baseline admits), made first, must stay alive: it
    proves the probe can see a live connection. It is made before the file `ready`
    is created; the caller waits for that file before the first flush, so the control
    is admitted (and marked) by the baseline, never made in a gap."""
    control = None
    if control_port:
        control = socket.create_connection((host, int(control_port)), timeout=5)
    if ready:
        open(ready, "w").close()
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    kept = []
    end = time.time() + float(seconds)
    attempts = 0
    # Bounded: in time, in attempts, and in the connections kept (file descriptors).
    while time.time() < end and attempts < 5000 and len(kept) < min(hard - 64, 1500):
        attempts += 1
        s = socket.socket(family(host), socket.SOCK_STREAM)
        s.settimeout(0.02)
        try:
            s.connect((host, int(port)))
            kept.append(s)
        except OSError:
            s.close()
    deadline = time.time() + 60
    while not os.path.exists(flag) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1)
    # Whatever arrived while the host was open (a server's greeting) proves nothing:
    # read it away, then ask each connection for fresh data.
    for s in kept + ([control] if control else []):
        s.setblocking(False)
        for _ in range(64):
            try:
                if not s.recv(4096):
                    break
            except OSError:
                break
    for s in kept + ([control] if control else []):
        try:
            s.send(b"vmlab\n")
        except OSError:
            pass
    # The control's echo first (up to 15 s: a guest under emulation, busy with the
    # intruder's server threads, can be slow); only then are the others counted, so a
    # "0 alive" cannot come from a system that had not yet answered anyone.
    control_alive = 0
    if control:
        control.setblocking(True)
        control.settimeout(15)
        try:
            control_alive = int(bool(control.recv(64)))
        except OSError:
            pass
    time.sleep(1)
    alive = 0
    for s in kept:
        try:
            if s.recv(64):
                alive += 1
        except OSError:
            pass
    print(f"attempts={attempts} through={len(kept)} control_alive={control_alive} alive={alive}")
    return True


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "tcp":
        ok = tcp(*args)
    elif cmd == "udp-echo":
        ok = udp_echo(*args)
    elif cmd == "udp-silent":
        ok = udp_silent(*args)
    elif cmd == "serve-tcp":
        serve_tcp_echo(*args)
        ok = True
    elif cmd == "serve-udp":
        serve_udp_echo(*args)
        ok = True
    elif cmd == "intruder":
        ok = intruder(*args)
    else:
        print(f"probe.py: unknown command {cmd}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
