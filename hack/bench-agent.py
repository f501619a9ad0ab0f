#!/usr/bin/env python3
"""Benchmark of loraplane-agent's OpenAI API against its engine alone.

Starts bin/loraplane-agent on free 127.0.0.1 ports with four adapters
(the SmolLM2 fixtures r4-qv, r8-od, r16-k, and r4-qv again as 'a4'), waits
for /ready and warms it up. Then, SEGMENTS times: runs bin/loraplane-generate
REQUESTS times on the CLIENTS prompts and adapters as one batch
(--ignore-eos, --max-num-seqs CLIENTS, the same --max-tokens; it checks
that CLIENTS sequences ran at once and reads the 'prompt:' and
'generation:' lines), then runs CLIENTS concurrent streaming clients
(CLIENTS / 4 per adapter) that each send REQUESTS /v1/completions requests
back to back (stream, temperature 0, ignore_eos, max_tokens fixed). The
short alternating segments put both programs under about the same load
from other jobs. It reports generated tokens per second, time to first
token, inter-token latency and CPU use, and the ratio of the HTTP speed to
the engine's; it stops the agent with SIGTERM and checks that it exits 0.

Output: 'bench: NAME VALUE UNIT' lines on stdout; progress on stderr.
Exit status 0 on success, 1 when anything failed or ran out of time.

  python3 hack/bench-agent.py --bin bin --model models/smollm2-135m-instruct-q4_1.gguf
"""

import argparse
import http.client
import json
import math
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_DIR = os.path.join(ROOT, "tests", "fixtures", "lora", "smollm2")
# name -> fixture directory; the fourth adapter is r4-qv under another name
ADAPTERS = [("r4-qv", "r4-qv"), ("r8-od", "r8-od"), ("r16-k", "r16-k"), ("a4", "r4-qv")]

SUBJECTS = ["fox", "heron", "badger", "otter", "falcon", "beaver", "lynx", "marten",
            "raven", "stoat", "weasel", "wren", "hare", "vole", "kestrel", "swift",
            "owl", "crane", "finch", "mole", "newt", "pike", "toad", "wolf",
            "bear", "deer", "elk", "goat", "lark", "moth", "seal", "yak"]


class BenchError(Exception):
    pass


def log(msg):
    print("bench-agent: " + msg, file=sys.stderr, flush=True)


def prompt_for(i):
    return ("The quick brown %s number %d jumps over the lazy dog while the farmer "
            "watches from the old wooden barn near the river bank, and then" %
            (SUBJECTS[i % len(SUBJECTS)], i))


def percentile(values, p):
    """Nearest-rank percentile of a non-empty list (p in 0..100)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100.0 * len(s)) - 1))]


class Agent:
    """A running loraplane-agent; its stderr is copied to a log file."""

    def __init__(self, bindir, model, max_num_seqs, threads, logpath):
        cmd = [os.path.join(bindir, "loraplane-agent"), "--model", model,
               "--host", "127.0.0.1", "--port", "0", "--admin-port", "0",
               "--device", "cpu", "--max-num-seqs", str(max_num_seqs),
               "--drain-timeout", "10", "--lora-modules"]
        cmd += ["%s=%s" % (name, os.path.join(LORA_DIR, d)) for name, d in ADAPTERS]
        if threads:
            cmd += ["--threads", str(threads)]
        self.cmd = cmd
        self.logf = open(logpath, "w")
        self.lines = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.logf.write(line)
            self.logf.flush()
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append(None)  # end of stream
            self.cond.notify_all()

    def wait_line(self, pattern, deadline):
        rx = re.compile(pattern)
        seen = 0
        with self.cond:
            while True:
                while seen < len(self.lines):
                    line = self.lines[seen]
                    seen += 1
                    if line is None:
                        raise BenchError("the agent exited (status %s) before logging '%s'"
                                         % (self.proc.wait(), pattern))
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError("the agent did not log '%s' in time" % pattern)
                self.cond.wait(left)

    def stop(self, timeout):
        """SIGTERM, then the exit status (SIGKILL and an error past timeout)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise BenchError("the agent did not exit within %g s of SIGTERM" % timeout)
        self.reader.join(5)
        self.logf.close()
        return rc


def read_stat(path):
    """(name, user + system CPU seconds) from a /proc stat file."""
    with open(path) as f:
        st = f.read()
    fields = st[st.rindex(")") + 2:].split()
    return (st[st.index("(") + 1:st.rindex(")")],
            (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))


def agent_cpu(pid):
    """CPU seconds used so far by the agent: 'total', and 'engine' for the
    threads that live as long as the process and are not civetweb's (the
    main thread, the engine thread, the compute pool's workers). Everything
    else is HTTP work: civetweb's threads and the thread each request is
    handled on (agent/api/server.c, dispatch_on_big_stack), which ends with
    the request. The kernel scales these utime + stime figures so that their
    sum is the scheduler's exact run time, dead threads included."""
    total = read_stat("/proc/%d/stat" % pid)[1]
    engine = 0.0
    base = "/proc/%d/task" % pid
    for tid in os.listdir(base):
        try:
            name, cpu = read_stat(os.path.join(base, tid, "stat"))
        except (OSError, ValueError):
            continue  # the thread ended
        if not name.startswith("civetweb"):
            engine += cpu
    return {"total": total, "engine": engine}


def http_get(port, path, timeout):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def engine_counters(admin_port):
    """The agent's engine counters from its admin /metrics."""
    status, body = http_get(admin_port, "/metrics", 10)
    if status != 200:
        raise BenchError("/metrics answered %d" % status)
    out = {}
    for name in ("steps", "preemptions", "prompt_tokens", "generated_tokens"):
        m = re.search(r"^loraplane_engine_%s_total (\d+)" % name, body.decode(), re.M)
        if not m:
            raise BenchError("no loraplane_engine_%s_total in /metrics" % name)
        out[name] = int(m.group(1))
    return out


def wait_ready(agent, port, deadline):
    while True:
        if agent.proc.poll() is not None:
            tail = "".join(l + "\n" for l in agent.lines[-3:] if l is not None)
            raise BenchError("the agent exited %d before it was ready:\n%s" %
                             (agent.proc.returncode, tail))
        try:
            status, _ = http_get(port, "/ready", 5)
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError("/ready did not answer 200 in time")
        time.sleep(0.1)


class Client(threading.Thread):
    """Sends requests one after another on one keep-alive connection and
    records, per request, the send time, the arrival time and bytes of every
    server-sent event, and (parsed after the run) the usage figures and the
    text. The HTTP is read straight from the socket and nothing is parsed
    while streams run, so that the clients take as little as possible of
    the CPU the agent runs on."""

    def __init__(self, port, model, prompt, max_tokens, n_requests, deadline, start_evt):
        super().__init__(daemon=True)
        self.port = port
        body = json.dumps({
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}).encode()
        self.request = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" %
                        (len(body), body))
        self.n_requests = n_requests
        self.deadline = deadline
        self.start_evt = start_evt
        self.raw = []      # (t_send, [(t_arrival, event bytes)])
        self.results = []  # (t_send, [text chunk times], completion_tokens, prompt_tokens, text)
        self.error = None

    def run(self):
        sock = None
        try:
            self.start_evt.wait()
            sock = socket.create_connection(("127.0.0.1", self.port),
                                            timeout=max(1.0, self.deadline - time.monotonic()))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = bytearray()
            for _ in range(self.n_requests):
                if time.monotonic() > self.deadline:
                    raise BenchError("ran out of time")
                self.raw.append(self.one(sock, buf))
        except Exception as e:  # reported by the main thread
            self.error = "%s: %s" % (type(e).__name__, e)
        finally:
            if sock:
                sock.close()

    @staticmethod
    def recv(sock, buf):
        data = sock.recv(65536)
        if not data:
            raise BenchError("the agent closed the connection")
        buf += data
        return time.perf_counter()

    def one(self, sock, buf):
        """One request; buf holds bytes read past the previous response."""
        t_send = time.perf_counter()
        sock.sendall(self.request)
        now = t_send
        while b"\r\n\r\n" not in buf:
            now = self.recv(sock, buf)
        end = buf.index(b"\r\n\r\n")
        head = bytes(buf[:end]).lower()
        del buf[:end + 4]
        if not head.startswith(b"http/1.1 200"):
            raise BenchError("answer: %s" % head.split(b"\r\n")[0].decode(errors="replace"))
        if b"transfer-encoding: chunked" not in head:
            raise BenchError("the stream is not chunked")
        events = []
        sse = bytearray()
        while True:  # one chunk: SIZE CRLF DATA CRLF; size 0 ends the body
            while b"\r\n" not in buf:
                now = self.recv(sock, buf)
            eol = buf.index(b"\r\n")
            size = int(bytes(buf[:eol]).split(b";")[0], 16)
            while len(buf) < eol + 2 + size + 2:
                now = self.recv(sock, buf)
            sse += buf[eol + 2:eol + 2 + size]
            del buf[:eol + 2 + size + 2]
            if size == 0:
                break
            while True:
                sep = sse.find(b"\n\n")
                if sep < 0:
                    break
                events.append((now, bytes(sse[:sep])))
                del sse[:sep + 2]
        return (t_send, events)

    def parse(self):
        """Turns the raw events into results once the run is over."""
        for t_send, events in self.raw:
            times, text, usage, done = [], [], None, False
            for t, ev in events:
                if not ev.startswith(b"data: "):
                    continue
                data = ev[6:].strip()
                if data == b"[DONE]":
                    done = True
                    continue
                obj = json.loads(data)
                if obj.get("usage"):
                    usage = obj["usage"]
                choices = obj.get("choices") or []
                if choices and choices[0].get("text"):
                    # a chunk with text: one token, or more when a token had
                    # no text of its own (a special token, part of a character)
                    times.append(t)
                    text.append(choices[0]["text"])
            if not done or usage is None:
                raise BenchError("a stream ended without usage and [DONE]")
            self.results.append((t_send, times, usage["completion_tokens"],
                                 usage["prompt_tokens"], "".join(text)))


def run_clients(port, n_clients, max_tokens, n_requests, timeout):
    deadline = time.monotonic() + timeout
    start_evt = threading.Event()
    clients = [Client(port, ADAPTERS[i % len(ADAPTERS)][0], prompt_for(i), max_tokens,
                      n_requests, deadline, start_evt) for i in range(n_clients)]
    for c in clients:
        c.start()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    start_evt.set()
    for c in clients:
        c.join(max(0.0, deadline - time.monotonic()) + 5)
        if c.is_alive():
            raise BenchError("a client did not finish within %g s" % timeout)
    t1 = time.perf_counter()
    cpu = time.process_time() - cpu0
    errors = [c.error for c in clients if c.error]
    if errors:
        raise BenchError("client failed: %s" % errors[0])
    for c in clients:
        c.parse()
    return clients, t0, t1, cpu


def engine_only(bindir, model, n, max_tokens, threads, timeout, tmpdir):
    path = os.path.join(tmpdir, "prompts.txt")
    with open(path, "w") as f:
        for i in range(n):
            f.write("%s\t%s\n" % (ADAPTERS[i % len(ADAPTERS)][0], prompt_for(i)))
    cmd = [os.path.join(bindir, "loraplane-generate"), "--model", model, "--prompts-file", path,
           "--max-tokens", str(max_tokens), "--ignore-eos", "--temperature", "0",
           "--max-num-seqs", str(n)]
    for name, d in ADAPTERS:
        cmd += ["--lora", "%s=%s" % (name, os.path.join(LORA_DIR, d))]
    if threads:
        cmd += ["--threads", str(threads)]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError("loraplane-generate did not finish within %g s" % timeout)
    if p.returncode != 0:
        raise BenchError("loraplane-generate exited %d: %s" % (p.returncode, p.stderr.strip()))
    mp = re.search(r"^prompt: (\d+) tokens in ([0-9.]+) s", p.stderr, re.M)
    mg = re.search(r"^generation: (\d+) tokens in ([0-9.]+) s, ([0-9.]+) tokens/s "
                   r"\((\d+) sequences\)", p.stderr, re.M)
    ml = re.search(r"^loaded '.*' in ([0-9.]+) s", p.stderr, re.M)
    if not mp or not mg or not ml:
        raise BenchError("no 'loaded', 'prompt:' or 'generation:' line in loraplane-generate's "
                         "stderr")
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    outs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    seqs = int(mg.group(4))
    total = sum(o["completion_tokens"] for o in outs)
    if seqs != n or len(outs) != n or total != n * max_tokens:
        raise BenchError("loraplane-generate did not run the same load: %d sequences, "
                         "%d outputs, %d tokens" % (seqs, len(outs), total))
    return {"prompt_s": float(mp.group(2)), "gen_tokens": int(mg.group(1)),
            "gen_s": float(mg.group(2)), "gen_tps": float(mg.group(3)),
            "e2e_tps": total / (float(mp.group(2)) + float(mg.group(2))),
            # CPU after the model load (which runs on one thread: its CPU
            # time is about its wall time)
            "cpu": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime) -
            float(ml.group(1)), "tokens": total,
            "texts": [o["completion"] for o in outs]}


def engine_segment(args, tmpdir):
    """loraplane-generate args.requests times: the work one HTTP segment does."""
    runs = []
    for _ in range(args.requests):
        e = engine_only(args.bin, args.model, args.clients, args.max_tokens, args.threads,
                        args.run_timeout, tmpdir)
        log("engine: prompt %.3f s, generation %.3f s, %.1f tokens/s (%.1f tokens/s with "
            "the prompt time), cpu %.2f s" %
            (e["prompt_s"], e["gen_s"], e["gen_tps"], e["e2e_tps"], e["cpu"]))
        runs.append(e)
    return runs


def http_segment(args, agent, port, admin_port):
    """args.clients clients, args.requests requests each, back to back."""
    cpu0 = agent_cpu(agent.proc.pid)
    k0 = engine_counters(admin_port)
    clients, t0, t1, cpu = run_clients(port, args.clients, args.max_tokens, args.requests,
                                       args.run_timeout)
    cpu1 = agent_cpu(agent.proc.pid)
    k1 = engine_counters(admin_port)
    h = {"tokens": 0, "ttft": [], "itl": [], "chunks": 0, "wall": t1 - t0, "client_cpu": cpu,
         "engine_cpu": cpu1["engine"] - cpu0["engine"],
         "http_cpu": (cpu1["total"] - cpu0["total"]) - (cpu1["engine"] - cpu0["engine"]),
         "steps": k1["steps"] - k0["steps"], "preemptions": k1["preemptions"] - k0["preemptions"],
         "prompt_tokens": clients[0].results[0][3],
         "texts": [c.results[0][4] for c in clients]}
    for c in clients:
        for (t_send, times, n_tok, _n_prompt, _text) in c.results:
            if n_tok != args.max_tokens:
                raise BenchError("a request generated %d tokens, not %d" % (n_tok, args.max_tokens))
            h["tokens"] += n_tok
            h["chunks"] += len(times)
            if times:
                h["ttft"].append(times[0] - t_send)
                h["itl"].extend(b - a for a, b in zip(times, times[1:]))
    h["tps"] = h["tokens"] / h["wall"]
    log("http: %d tokens in %.3f s, %.1f tokens/s, %d text chunks, %d engine steps, "
        "%d preemptions; cpu: agent's engine threads %.2f s, HTTP threads %.2f s, "
        "clients %.2f s" %
        (h["tokens"], h["wall"], h["tps"], h["chunks"], h["steps"], h["preemptions"],
         h["engine_cpu"], h["http_cpu"], h["client_cpu"]))
    return h


def measure(args, tmpdir):
    """Starts the agent, warms it up, then alternates engine-only and HTTP
    segments; stops the agent and checks its exit status."""
    engines, https = [], []
    agent = Agent(args.bin, args.model, args.clients, args.threads,
                  os.path.join(tmpdir, "agent.log"))
    ok = False
    try:
        t_start = time.monotonic()
        m = agent.wait_line(r"listening: api http://[0-9.]+:(\d+), admin http://[0-9.]+:(\d+)",
                            t_start + args.start_timeout)
        port, admin_port = int(m.group(1)), int(m.group(2))
        wait_ready(agent, port, t_start + args.start_timeout)
        status, body = http_get(port, "/v1/models", 10)
        ids = [d["id"] for d in json.loads(body)["data"]] if status == 200 else []
        missing = [name for name, _ in ADAPTERS if name not in ids]
        if missing:
            raise BenchError("adapters missing from /v1/models: %s" % ", ".join(missing))
        log("agent ready on port %d in %.1f s; warm-up" % (port, time.monotonic() - t_start))
        run_clients(port, args.clients, args.max_tokens, 1, args.run_timeout)
        for seg in range(args.segments):
            log("segment %d/%d: loraplane-generate %d times (%d prompts as one batch), then "
                "%d clients x %d requests" %
                (seg + 1, args.segments, args.requests, args.clients, args.clients,
                 args.requests))
            engines.extend(engine_segment(args, tmpdir))
            https.append(http_segment(args, agent, port, admin_port))
        ok = True
    finally:
        if not ok:  # an error is on its way: stop the agent without masking it
            try:
                agent.stop(args.stop_timeout)
            except BenchError:
                pass
    rc = agent.stop(args.stop_timeout)
    if rc != 0:
        tail = "".join(l + "\n" for l in agent.lines[-5:] if l is not None)
        raise BenchError("the agent exited %s after SIGTERM; its last lines:\n%s" % (rc, tail))
    return engines, https


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="bin", help="directory of loraplane-agent and "
                    "loraplane-generate (default bin)")
    ap.add_argument("--model", default="models/smollm2-135m-instruct-q4_1.gguf")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--requests", type=int, default=2,
                    help="requests per client per segment, back to back (default 2)")
    ap.add_argument("--segments", type=int, default=3,
                    help="engine-only and HTTP segments, alternated (default 3)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0,
                    help="compute threads for both programs (default: theirs, every CPU)")
    ap.add_argument("--start-timeout", type=float, default=120)
    ap.add_argument("--run-timeout", type=float, default=300,
                    help="limit on each client phase and each loraplane-generate run")
    ap.add_argument("--stop-timeout", type=float, default=30)
    args = ap.parse_args()
    if args.clients < len(ADAPTERS) or args.clients > len(SUBJECTS) * 8:
        ap.error("--clients must be in [%d, %d]" % (len(ADAPTERS), len(SUBJECTS) * 8))
    if args.requests < 1 or args.segments < 1 or args.max_tokens < 2:
        ap.error("--requests and --segments must be >= 1, --max-tokens >= 2")
    for prog in ("loraplane-agent", "loraplane-generate"):
        if not os.access(os.path.join(args.bin, prog), os.X_OK):
            ap.error("'%s' is not an executable (build it with make)" %
                     os.path.join(args.bin, prog))
    if not os.path.isfile(args.model):
        ap.error("model '%s' not found (run bash hack/deps.sh)" % args.model)

    # SIGTERM (a time limit around make bench) unwinds like an error, so
    # that the agent is stopped rather than left running
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmpdir:
            engines, https = measure(args, tmpdir)
    except BenchError as ex:
        print("bench-agent: %s" % ex, file=sys.stderr)
        return 1

    same = sum(1 for a, b in zip(https[0]["texts"], engines[0]["texts"]) if a == b)
    log("%d of %d completions equal loraplane-generate's" % (same, args.clients))
    tokens = sum(h["tokens"] for h in https)
    http_tps = tokens / sum(h["wall"] for h in https)
    gen_tps = sum(e["gen_tokens"] for e in engines) / sum(e["gen_s"] for e in engines)
    e_tokens = sum(e["tokens"] for e in engines)
    e2e_tps = e_tokens / sum(e["prompt_s"] + e["gen_s"] for e in engines)
    ratios = []
    for i, h in enumerate(https):
        seg = engines[i * args.requests:(i + 1) * args.requests]
        ratios.append(h["tps"] / (sum(e["tokens"] for e in seg) /
                                  sum(e["prompt_s"] + e["gen_s"] for e in seg)))
    log("HTTP/engine by segment: %s" % ", ".join("%.3f" % r for r in ratios))
    ttft = [x for h in https for x in h["ttft"]]
    itl = [x for h in https for x in h["itl"]]
    if not ttft or not itl:
        print("bench-agent: the streams carried no text", file=sys.stderr)
        return 1
    engine_cpu = sum(h["engine_cpu"] for h in https)
    http_cpu = sum(h["http_cpu"] for h in https)

    def out(name, value, unit):
        print("bench: %s %s %s" % (name, value, unit), flush=True)

    out("agent_load", "%dx%d" % (args.clients, args.max_tokens), "clients_x_max_tokens")
    out("agent_prompt_tokens", https[0]["prompt_tokens"], "tokens")
    out("agent_http_tokens_per_s", "%.1f" % http_tps, "tokens/s")
    out("agent_ttft_p50_ms", "%.1f" % (percentile(ttft, 50) * 1e3), "ms")
    out("agent_ttft_p99_ms", "%.1f" % (percentile(ttft, 99) * 1e3), "ms")
    out("agent_itl_p50_ms", "%.1f" % (percentile(itl, 50) * 1e3), "ms")
    out("agent_itl_p99_ms", "%.1f" % (percentile(itl, 99) * 1e3), "ms")
    # loraplane-generate takes max_tokens steps per batch: one for all the
    # prompts, then one per further token
    out("agent_engine_steps_per_round", "%.1f" % (sum(h["steps"] for h in https) /
                                                  (args.segments * args.requests)), "steps")
    out("agent_engine_only_prompt_ms",
        "%.1f" % (1e3 * sum(e["prompt_s"] for e in engines) / len(engines)), "ms")
    out("agent_engine_only_step_ms", "%.1f" % (1e3 * sum(e["gen_s"] for e in engines) /
                                               (len(engines) * (args.max_tokens - 1))), "ms")
    out("agent_engine_only_tokens_per_s", "%.1f" % gen_tps, "tokens/s")
    out("agent_engine_only_with_prompt_tokens_per_s", "%.1f" % e2e_tps, "tokens/s")
    out("agent_http_to_engine_ratio", "%.3f" % (http_tps / e2e_tps), "ratio")
    out("agent_http_to_engine_decode_ratio", "%.3f" % (http_tps / gen_tps), "ratio")
    out("agent_engine_only_cpu_ms_per_token",
        "%.2f" % (1e3 * sum(e["cpu"] for e in engines) / e_tokens), "ms")
    out("agent_engine_threads_cpu_ms_per_token", "%.2f" % (1e3 * engine_cpu / tokens), "ms")
    out("agent_http_threads_cpu_ms_per_token", "%.3f" % (1e3 * http_cpu / tokens), "ms")
    out("agent_http_cpu_overhead_pct", "%.1f" % (100 * http_cpu / engine_cpu), "%")
    out("agent_client_cpu_ms_per_token",
        "%.3f" % (1e3 * sum(h["client_cpu"] for h in https) / tokens), "ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
