#!/usr/bin/env python3
"""loraplane side by side with llama.cpp (issue 13, "Speed"): the same GGUF
file, the same number of threads, rounds alternated between the two.

Models (--models picks some; derived files are cached in .tools/bench-models/):
  q4_1           models/smollm2-135m-instruct-q4_1.gguf, the default model
  q4_0, q8_0     copies of it made by hack/requant-gguf.py (every matrix in
                 that type; needs a Python with gguf and numpy, --ref-python)
  q4_k_m         llama-quantize's Q4_K_M of an F16 copy made by requant-gguf.py
  gemma3_q4_k_m  models/gemma-3-270m-q4_k_m.gguf

Per model and round, loraplane first, then llama.cpp; each server is started,
measured and stopped before the other starts:
  prefill512  a 512-token prompt (the same token ids on both) with
              max_tokens 1 from one client, best of 3: 512 / response time,
              in prompt tokens/s. Prefix caching is off on both
              (--no-enable-prefix-caching; cache_prompt: false).
  decodeN     N concurrent clients (1, 8, 32), each with its own short
              prompt, send non-streaming completions back to back
              (max_tokens 64, temperature 0, ignore_eos) until every client
              has sent --decode-tokens / (64 N) requests (at least one):
              generated tokens / wall time, in tokens/s.
  engine_prefill512  the engines alone: loraplane's build/tools/bench
              --only prefill against llama-bench -p 512 -n 0, same threads.
Servers: loraplane-agent --threads T --max-num-seqs 32 --max-model-len 1024
--no-enable-prefix-caching; llama-server -t T -tb T -np 32 -c 32*768
(continuous batching is its default) --cache-ram 0. Each figure is the best
of --rounds rounds; ratio = loraplane / llama.cpp (above 1: loraplane faster).

Output: 'bench: llamacpp_MODEL_FIGURE_{loraplane,llamacpp,ratio} VALUE UNIT'
lines and a table on stdout; progress on stderr. Exit status 0 on success,
1 when a measurement failed (the other models still run).

  python3 hack/bench-llamacpp.py --bin bin --llama-bin .tools/llama.cpp/build/bin
"""

import argparse
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _load(name):
    """A sibling script as a module (their names hold dashes)."""
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"),
                                                  os.path.join(HERE, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


workloads = _load("bench-workloads")  # Agent, get, system_prompt
bench_agent = _load("bench-agent")    # prompt_for
BenchError = workloads.BenchError

DEFAULT_MODEL = "models/smollm2-135m-instruct-q4_1.gguf"
CACHE = os.path.join(ROOT, ".tools", "bench-models")
# key -> (how the file is made, source, type)
MODELS = {
    "q4_1": ("file", DEFAULT_MODEL, None),
    "q4_0": ("requant", DEFAULT_MODEL, "q4_0"),
    "q8_0": ("requant", DEFAULT_MODEL, "q8_0"),
    "q4_k_m": ("quantize", DEFAULT_MODEL, "Q4_K_M"),
    "gemma3_q4_k_m": ("file", "models/gemma-3-270m-q4_k_m.gguf", None),
}
PREFILL_TOKENS = 512
MAX_TOKENS = 64
MAX_SEQS = 32
SLOT_CTX = 768  # llama-server's context per slot: the prefill prompt and more, a multiple of 256
SERVED = "bench"


def log(msg):
    print("bench-llamacpp: " + msg, file=sys.stderr, flush=True)


def out(name, value, unit):
    print("bench: %s %s %s" % (name, value, unit), flush=True)


def tail(path, n=5):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).rstrip()
    except OSError:
        return ""


# ---- model files ----

def run_checked(cmd, what, timeout):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError("%s did not finish within %d s" % (what, timeout))
    if p.returncode != 0:
        raise BenchError("%s exited %d: %s" % (what, p.returncode,
                                               (p.stderr or p.stdout).strip()[-400:]))
    return p


def cached(path, make):
    """path, made by make(tmp) into a temporary name first when missing, so
    that an interrupted run leaves no half-written model to reuse."""
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".part"
    try:
        make(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def model_file(key, args):
    """(the GGUF file of a model key, None), derived files made once and
    cached; (None, why) when it cannot be had here."""
    how, src, qtype = MODELS[key]
    src = os.path.join(ROOT, src)
    if not os.path.isfile(src):
        return None, "'%s' not found (make deps downloads it)" % os.path.relpath(src, ROOT)
    if how == "file":
        return src, None
    stem = os.path.basename(src)[:-len(".gguf")]
    stem = stem[:-len("-q4_1")] if stem.endswith("-q4_1") else stem
    dst = os.path.join(CACHE, "%s-%s.gguf" % (stem, qtype.lower()))
    if os.path.isfile(dst):
        return dst, None
    if not args.ref_python:
        return None, ("'%s' is not made yet and no Python here has the gguf and numpy "
                      "packages that hack/requant-gguf.py needs (--ref-python; hack/README.md)" %
                      os.path.relpath(dst, ROOT))

    def requant_to(t):
        def make(tmp):
            log("making the %s copy of %s with hack/requant-gguf.py" % (t, src))
            run_checked([args.ref_python, os.path.join(HERE, "requant-gguf.py"), src, tmp, t],
                        "requant-gguf.py", 1800)
        return cached(os.path.join(CACHE, "%s-%s.gguf" % (stem, t)), make)

    if how == "requant":
        return requant_to(qtype), None
    f16 = requant_to("f16")

    def make(tmp):
        log("making %s from %s with llama-quantize" % (qtype, f16))
        run_checked([os.path.join(args.llama_bin, "llama-quantize"), f16, tmp, qtype],
                    "llama-quantize", 1800)
    return cached(dst, make), None


def loadavg():
    """The 1-minute load average: other work on the machine skews the
    figures (llama.cpp's most, in our runs)."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def find_ref_python(given):
    for py in ([given] if given else ["/opt/lpref/bin/python", sys.executable]):
        if py and shutil.which(py) and subprocess.run(
                [py, "-c", "import gguf, numpy"], capture_output=True).returncode == 0:
            return py
    return None


# ---- servers ----

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Loraplane:
    name = "loraplane"
    extra_body = {}

    def __init__(self, args, model, logpath):
        self.logpath = logpath
        self.agent = workloads.Agent(
            args.bin, model,
            ["--served-model-name", SERVED, "--threads", str(args.threads),
             "--max-num-seqs", str(MAX_SEQS), "--max-model-len", "1024",
             "--no-enable-prefix-caching"], logpath)

    def wait_ready(self, deadline):
        try:
            self.agent.wait_ready(deadline)
        except BenchError as e:
            raise BenchError("loraplane-agent: %s\n%s" % (e, tail(self.logpath)))
        self.port = self.agent.port

    def stop(self):
        rc = self.agent.stop()
        if rc != 0:
            raise BenchError("loraplane-agent exited %d on SIGTERM:\n%s" % (rc, tail(self.logpath)))


class LlamaServer:
    name = "llamacpp"
    extra_body = {"cache_prompt": False}

    def __init__(self, args, model, logpath):
        self.logpath = logpath
        self.port = free_port()
        cmd = [os.path.join(args.llama_bin, "llama-server"), "-m", model,
               "--host", "127.0.0.1", "--port", str(self.port), "-a", SERVED,
               "-t", str(args.threads), "-tb", str(args.threads),
               "-np", str(MAX_SEQS), "-c", str(MAX_SEQS * SLOT_CTX), "-cb",
               "--cache-ram", "0", "--no-webui"]
        self.logf = open(logpath, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.logf,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, deadline):
        while True:
            if self.proc.poll() is not None:
                raise BenchError("llama-server exited %d before it was ready:\n%s" %
                                 (self.proc.returncode, tail(self.logpath)))
            try:
                if workloads.get(self.port, "/health")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError("llama-server was not ready in time:\n%s" % tail(self.logpath))
            time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise BenchError("llama-server did not exit within 30 s of SIGTERM")
        finally:
            self.logf.close()


# ---- load ----

class Conn:
    """One keep-alive connection sending non-streaming completions."""

    def __init__(self, server, timeout):
        self.server = server
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)

    def complete(self, ids, max_tokens):
        body = {"model": SERVED, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}
        body.update(self.server.extra_body)
        self.conn.request("POST", "/v1/completions", json.dumps(body),
                          {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise BenchError("%s answered %d: %s" % (self.server.name, resp.status, data[:300]))
        usage = json.loads(data)["usage"]
        if usage["prompt_tokens"] != len(ids) or usage["completion_tokens"] != max_tokens:
            raise BenchError("%s: %d prompt and %d completion tokens, not %d and %d" %
                             (self.server.name, usage["prompt_tokens"],
                              usage["completion_tokens"], len(ids), max_tokens))
        cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        if cached_tokens:
            raise BenchError("%s took %d prompt tokens from a cache" %
                             (self.server.name, cached_tokens))

    def close(self):
        self.conn.close()


def prefill(server, ids, timeout):
    """Best of 3: prompt tokens per second of one max_tokens 1 request."""
    c = Conn(server, timeout)
    try:
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            c.complete(ids, 1)
            best = max(best, len(ids) / (time.perf_counter() - t0))
        return best
    finally:
        c.close()


def decode(server, prompts, n_clients, n_requests, timeout):
    """n_clients clients, n_requests completions each, back to back:
    generated tokens per second over the whole run."""
    start = threading.Event()
    errors = []

    def client(i):
        c = Conn(server, timeout)
        try:
            start.wait()
            for _ in range(n_requests):
                c.complete(prompts[i], MAX_TOKENS)
        except Exception as e:  # reported by the main thread
            errors.append("%s: %s" % (type(e).__name__, e))
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(n_clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    start.set()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            raise BenchError("%s: a client did not finish within %g s" % (server.name, timeout))
    wall = time.perf_counter() - t0
    if errors:
        raise BenchError(errors[0])
    return n_clients * n_requests * MAX_TOKENS / wall


def tokenize(port, text):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/tokenize", json.dumps({"model": SERVED, "prompt": text}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise BenchError("/tokenize answered %d: %s" % (resp.status, data[:200]))
        return json.loads(data)["tokens"]
    finally:
        conn.close()


def server_round(cls, args, model, tmpdir, prompts, figures):
    """Starts one server, warms it up, measures every figure into figures
    (name -> list of values), stops it. prompts is filled from loraplane's
    tokenizer on its first round, so both servers get the same token ids."""
    server = cls(args, model, os.path.join(tmpdir, cls.name + ".log"))
    ok = False
    try:
        t0 = time.monotonic()
        server.wait_ready(t0 + args.start_timeout)
        if not prompts:
            if cls is not Loraplane:
                raise BenchError("no prompts: loraplane's round comes first")
            ids = tokenize(server.port, workloads.system_prompt(800))
            if len(ids) < PREFILL_TOKENS:
                raise BenchError("the prefill text is only %d tokens" % len(ids))
            prompts["prefill"] = ids[:PREFILL_TOKENS]
            prompts["decode"] = [tokenize(server.port, bench_agent.prompt_for(i))
                                 for i in range(MAX_SEQS)]
        log("%s ready in %.1f s; warm-up" % (cls.name, time.monotonic() - t0))
        c = Conn(server, args.run_timeout)
        try:
            c.complete(prompts["prefill"], 1)
            c.complete(prompts["decode"][0], MAX_TOKENS)
        finally:
            c.close()
        v = prefill(server, prompts["prefill"], args.run_timeout)
        log("%s: prefill %.1f tokens/s" % (cls.name, v))
        figures.setdefault("prefill512", []).append(v)
        for n in args.clients:
            reqs = max(1, -(-args.decode_tokens // (MAX_TOKENS * n)))
            v = decode(server, prompts["decode"], n, reqs, args.run_timeout)
            log("%s: %d clients x %d requests: %.1f tokens/s" % (cls.name, n, reqs, v))
            figures.setdefault("decode%d" % n, []).append(v)
        ok = True
    finally:
        if ok:
            server.stop()
        else:  # an error is on its way: stop the server without masking it
            try:
                server.stop()
            except BenchError:
                pass


def engine_prefill_loraplane(args, model):
    p = run_checked([args.bench_tool, "--model", model, "--threads", str(args.threads),
                     "--only", "prefill"], "bench --only prefill", args.run_timeout)
    for line in p.stdout.splitlines():
        f = line.split()
        if len(f) == 4 and f[:2] == ["bench:", "prompt_tokens_per_s"]:
            return float(f[2])
    raise BenchError("no prompt_tokens_per_s line from %s" % args.bench_tool)


def engine_prefill_llamacpp(args, model):
    p = run_checked([os.path.join(args.llama_bin, "llama-bench"), "-m", model,
                     "-p", str(PREFILL_TOKENS), "-n", "0", "-t", str(args.threads),
                     "-r", "3", "-o", "json"], "llama-bench", args.run_timeout)
    try:
        row = next(r for r in json.loads(p.stdout) if r["n_prompt"] == PREFILL_TOKENS)
        # the best repetition, as bench --only prefill reports its best of 3
        return float(max(row.get("samples_ts") or [row["avg_ts"]]))
    except (ValueError, KeyError, StopIteration, TypeError):
        raise BenchError("llama-bench printed no pp%d result" % PREFILL_TOKENS)


def bench_model(key, model, args, tmpdir):
    """{figure: (loraplane best, llama.cpp best, unit)} for one model."""
    lp, cpp, prompts = {}, {}, {}
    for r in range(args.rounds):
        log("%s: round %d/%d" % (key, r + 1, args.rounds))
        server_round(Loraplane, args, model, tmpdir, prompts, lp)
        server_round(LlamaServer, args, model, tmpdir, prompts, cpp)
        if args.bench_tool:
            lp.setdefault("engine_prefill512", []).append(engine_prefill_loraplane(args, model))
            cpp.setdefault("engine_prefill512", []).append(engine_prefill_llamacpp(args, model))
            log("%s: engines alone: prefill %.1f / %.1f tokens/s" %
                (key, lp["engine_prefill512"][-1], cpp["engine_prefill512"][-1]))
    return {f: (max(lp[f]), max(cpp[f])) for f in lp}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="bin", help="directory of loraplane-agent (default bin)")
    ap.add_argument("--bench-tool", default="build/tools/bench",
                    help="loraplane's engine bench (hack/bench.c) for the engines-alone "
                    "prefill figure; '' skips it (default build/tools/bench)")
    ap.add_argument("--llama-bin", default=".tools/llama.cpp/build/bin",
                    help="directory of llama-server, llama-bench and llama-quantize "
                    "(hack/llama-cpp.sh builds them; default .tools/llama.cpp/build/bin)")
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated, of %s (default all)" % ", ".join(MODELS))
    ap.add_argument("--rounds", type=int, default=2, help="rounds per model, best kept (default 2)")
    ap.add_argument("--clients", default="1,8,32",
                    help="concurrent decode clients, comma-separated, each at most %d "
                    "(default 1,8,32)" % MAX_SEQS)
    ap.add_argument("--decode-tokens", type=int, default=1024,
                    help="tokens each decode figure generates at least (default 1024)")
    ap.add_argument("--quick", action="store_true",
                    help="development: one round, 8 clients only")
    ap.add_argument("--threads", type=int, default=2, help="threads of both (default 2)")
    ap.add_argument("--ref-python", default=None,
                    help="a Python with gguf and numpy for hack/requant-gguf.py "
                    "(default /opt/lpref/bin/python, else this one)")
    ap.add_argument("--start-timeout", type=float, default=120)
    ap.add_argument("--run-timeout", type=float, default=600,
                    help="limit on each measurement (seconds, default 600)")
    args = ap.parse_args()

    keys = [k for k in args.models.split(",") if k]
    unknown = [k for k in keys if k not in MODELS]
    if unknown or not keys:
        ap.error("--models: unknown model '%s' (known: %s)" %
                 (",".join(unknown), ", ".join(MODELS)))
    try:
        args.clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        ap.error("--clients: a comma-separated list of integers")
    if args.quick:
        args.rounds, args.clients = 1, [8]
    if any(c < 1 or c > MAX_SEQS for c in args.clients):
        ap.error("--clients: each in [1, %d]" % MAX_SEQS)
    if args.rounds < 1 or args.threads < 1 or args.decode_tokens < 1:
        ap.error("--rounds, --threads and --decode-tokens must be >= 1")
    if not os.access(os.path.join(args.bin, "loraplane-agent"), os.X_OK):
        ap.error("'%s' is not an executable (build it with make)" %
                 os.path.join(args.bin, "loraplane-agent"))
    if args.bench_tool and not os.access(args.bench_tool, os.X_OK):
        ap.error("--bench-tool '%s' is not an executable (make %s, or --bench-tool '')" %
                 (args.bench_tool, args.bench_tool))
    for prog in ("llama-server", "llama-bench", "llama-quantize"):
        if not os.access(os.path.join(args.llama_bin, prog), os.X_OK):
            ap.error("'%s' is not an executable (bash hack/llama-cpp.sh builds it)" %
                     os.path.join(args.llama_bin, prog))
    args.bin, args.llama_bin = os.path.abspath(args.bin), os.path.abspath(args.llama_bin)
    if args.bench_tool:
        args.bench_tool = os.path.abspath(args.bench_tool)
    args.ref_python = find_ref_python(args.ref_python)

    # SIGTERM (a time limit around make bench) unwinds like an error, so
    # that the servers are stopped rather than left running
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    units = {"prefill512": "tokens/s", "engine_prefill512": "tokens/s"}
    results, failed = [], False
    load0 = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmpdir:
        for key in keys:
            try:
                model, why = model_file(key, args)
                if why:
                    out("llamacpp_%s" % key, "skipped:", why)
                    continue
                log("%s: %s" % (key, os.path.relpath(model, ROOT)))
                figs = bench_model(key, model, args, tmpdir)
            except BenchError as e:
                log("%s failed: %s" % (key, e))
                failed = True
                continue
            for fig, (a, b) in figs.items():
                unit = units.get(fig, "tokens/s")
                name = "llamacpp_%s_%s" % (key, fig)
                out(name + "_loraplane", "%.1f" % a, unit)
                out(name + "_llamacpp", "%.1f" % b, unit)
                out(name + "_ratio", "%.3f" % (a / b), "ratio")
                results.append((key, fig, a, b))
    if results:
        print("\n%-14s %-18s %10s %10s %7s" % ("model", "figure (tokens/s)", "loraplane",
                                              "llama.cpp", "ratio"))
        for key, fig, a, b in results:
            print("%-14s %-18s %10.1f %10.1f %7.3f" % (key, fig, a, b, a / b))
        print("(best of %d round%s, %d threads each; load average %s at the start, %s at "
              "the end)" % (args.rounds, "" if args.rounds == 1 else "s", args.threads, load0,
                            loadavg()), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
