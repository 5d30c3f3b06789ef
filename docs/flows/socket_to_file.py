# Socket -> file on loopback (docs/FLOWS.md, tenth session): CPU per GB of the receiving thread alone
# (RUSAGE_THREAD), splice through a pipe of P bytes against a read/write loop with a buffer of B bytes, alternated
# in every round; the feeder is a thread of its own (its CPU not counted). Usage: socket_to_file.py MIB ROUNDS
# (MSS=N in the environment sets the feeder's TCP_MAXSEG).
import os, socket, threading, resource, sys, time, fcntl, tempfile

def thread_cpu():
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime + r.ru_stime

MSS = int(os.environ.get("MSS", "0"))
def feeder(port, total, out):
    s = socket.socket()
    if MSS: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, MSS)
    s.connect(("127.0.0.1", port))
    buf = b"\x5a" * (1 << 20)
    sent = 0
    while sent < total:
        s.sendall(buf[: min(len(buf), total - sent)])
        sent += min(len(buf), total - sent)
    s.close()

def run(kind, size, total, path):
    l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
    th = threading.Thread(target=feeder, args=(l.getsockname()[1], total, None)); th.start()
    c, _ = l.accept()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = thread_cpu(); w0 = time.time(); n = 0; calls = 0
    if kind == "splice":
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_MORE
        while True:
            k = os.splice(c.fileno(), w, size, flags=flags); calls += 1
            if k == 0: break
            left = k
            while left:
                m = os.splice(r, fd, left, flags=flags); calls += 1
                left -= m
            n += k
        os.close(r); os.close(w)
    else:
        buf = bytearray(size); mv = memoryview(buf)
        while True:
            k = c.recv_into(mv); calls += 1
            if k == 0: break
            o = 0
            while o < k:
                o += os.write(fd, mv[o:k]); calls += 1
            n += k
    cpu = thread_cpu() - t0; wall = time.time() - w0
    os.close(fd); c.close(); l.close(); th.join()
    assert n == total, (n, total)
    os.unlink(path)
    return cpu / (total / 1e9), total / 1e6 / wall, calls

total = int(sys.argv[1]) << 20
rounds = int(sys.argv[2])
progs = [("splice", 1 << 20), ("splice", 256 << 10), ("splice", 64 << 10), ("loop", 64 << 10), ("loop", 256 << 10), ("loop", 1 << 20)]
res = {p: [] for p in progs}
for i in range(rounds):
    for p in progs:
        res[p].append(run(p[0], p[1], total, os.path.join(tempfile.gettempdir(), f"socket-to-file-{os.getpid()}")))
for p in progs:
    v = sorted(res[p])
    print(f"{p[0]:6} {p[1]>>10:5} KiB: CPU s/GB median {v[len(v)//2][0]:.3f} (rounds {' '.join(f'{x[0]:.3f}' for x in res[p])}), MB/s {v[len(v)//2][1]:.0f}, calls {v[0][2]}")
