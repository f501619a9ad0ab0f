#!/usr/bin/env python3
"""--device as a user meets it, with real loraplane-agent and
loraplane-generate processes.

Without a GPU (CI): '--device cuda' exits 1 with one line naming what is
missing: the driver, a CUDA library (hidden from the dynamic loader here:
ld.so --inhibit-cache with a library path that holds the programs' own
libraries but not CUDA's), or the shared object itself; '--device auto'
serves on the CPU and logs why; a bad value is a usage error (exit 2).
With a GPU (nvidia-smi lists one; make test-gpu): '--device cuda' and
'auto' serve on it. Prints one PASS/FAIL line per test."""

import glob
import os
import shutil
import subprocess
import tempfile

import harness as A

SO = os.path.join(A.BIN_DIR, "libloraplane-cuda.so")
TMP = tempfile.mkdtemp(prefix="lp-device-")
BASE = ["--model", A.TINY, "--host", "127.0.0.1", "--port", "0", "--admin-port", "0",
        *A.TINY_ARGS]


def have_gpu():
    try:
        p = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and any(line.startswith("GPU") for line in p.stdout.splitlines())


GPU = have_gpu()


def run(cmd, env=None, timeout=120):
    full_env = dict(os.environ)
    full_env.update(env or {})
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout,
                       env=full_env)
    out = p.stdout + p.stderr
    A.check_clean(out)
    return p.returncode, out


def agent_fails(*args, env=None, prefix=()):
    """Runs an agent that must not start: (exit status, its error lines)."""
    rc, out = run([*prefix, A.AGENT, *BASE, *args], env=env)
    errors = [line for line in out.splitlines() if "error" in line or "loraplane-agent:" in line]
    assert "listening:" not in out, "the agent opened its ports:\n" + out[-2000:]
    return rc, errors, out


def one_error(errors, out):
    assert len(errors) == 1, f"want one error line, got {len(errors)}:\n{out[-2000:]}"
    return errors[0]


def hidden_cuda_libraries():
    """A loader prefix under which CUDA's libraries cannot be found: no
    ld.so.cache, and a library path with the directories of the agent's
    own dependencies, less any that holds libcublas."""
    out = subprocess.run(["ldd", A.AGENT], capture_output=True, text=True, check=True).stdout
    loader, dirs = None, []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            d = os.path.dirname(parts[2])
            if d not in dirs and not glob.glob(os.path.join(d, "libcublas.so*")):
                dirs.append(d)
        elif parts and "ld-linux" in parts[0]:
            loader = parts[0]
    assert loader, "no dynamic loader in ldd's output:\n" + out
    return [loader, "--inhibit-cache", "--library-path", ":".join(dirs)]


def built_with_cuda():
    return os.path.exists(SO)


@A.test
def bad_device_values_are_usage_errors():
    for value in ("tpu", "cuda:x", "cuda:", "cuda:-1", "cuda:99999", "CPU", ""):
        rc, errors, out = agent_fails("--device", value)
        assert rc == 2, f"--device {value!r}: exit {rc}, want 2:\n{out[-1500:]}"
        line = one_error(errors, out)
        assert f"'{value}'" in line and "cuda:N" in line, \
            f"--device {value!r}: the message does not name the value and the choices: {line}"
    rc, out = run([A.GENERATE, "--model", A.TINY, "--prompt", "hi", "--device", "tpu"])
    assert rc == 2 and "'tpu'" in out, f"loraplane-generate --device tpu: exit {rc}:\n{out}"


@A.test
def cuda_without_a_driver_is_one_clear_error():
    if GPU:
        return
    rc, errors, out = agent_fails("--device", "cuda")
    assert rc == 1, f"exit {rc}, want 1:\n{out[-2000:]}"
    line = one_error(errors, out)
    assert "'--device cuda'" in line and "'--device cpu' or 'auto' runs on the CPU" in line, line
    if built_with_cuda():
        assert "driver" in line and "cudaError" in line, f"no driver named: {line}"
    else:
        assert "this build has no CUDA backend" in line, line
    # cuda:1 fails the same way (the driver check comes before the device count)
    rc, errors, out = agent_fails("--device", "cuda:1")
    assert rc == 1 and len(errors) == 1, out[-2000:]


@A.test
def missing_cuda_libraries_are_named():
    if not built_with_cuda():
        return
    rc, errors, out = agent_fails("--device", "cuda", env={"LORAPLANE_CUDA_LIB": SO},
                                  prefix=hidden_cuda_libraries())
    assert rc == 1, f"exit {rc}, want 1:\n{out[-2000:]}"
    line = one_error(errors, out)
    assert "libcublas" in line and "cannot open shared object file" in line, line
    assert "LD_LIBRARY_PATH" in line, f"no hint on what to install or set: {line}"


@A.test
def missing_shared_object_says_the_build_has_no_cuda():
    # a copy of the agent in a directory without the shared object
    d = os.path.join(TMP, "bin")
    os.makedirs(d, exist_ok=True)
    agent = os.path.join(d, "loraplane-agent")
    shutil.copy2(A.AGENT, agent)
    env = {k: v for k, v in os.environ.items() if k != "LORAPLANE_CUDA_LIB"}
    p = subprocess.run([agent, *BASE, "--device", "cuda"], capture_output=True, text=True,
                       env=env, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 1, f"exit {p.returncode}:\n{out}"
    assert "this build has no CUDA backend" in out and d in out, out
    rc, errors, out = agent_fails("--device", "cuda",
                                  env={"LORAPLANE_CUDA_LIB": os.path.join(TMP, "nothing.so")})
    assert rc == 1 and "no CUDA backend at" in one_error(errors, out), out


@A.test
def auto_serves_on_the_cpu_and_says_why():
    if GPU:
        return
    with A.Agent("--device", "auto", *A.TINY_ARGS) as agent:
        m = agent.wait_log(r"device: cpu, .*\('auto' chose the CPU: (.+)\)")
        why = m.group(1)
        if built_with_cuda():
            assert "driver" in why, why
        else:
            assert "no CUDA backend" in why, why
        assert agent.serving()
    rc, out = run([A.GENERATE, "--model", A.TINY, "--prompt", "hi", "--max-tokens", "2",
                   "--threads", "1", "--device", "auto"])
    assert rc == 0 and "'auto' chose the CPU" in out, f"exit {rc}:\n{out}"


@A.test
def cpu_logs_its_device():
    with A.Agent("--device", "cpu", *A.TINY_ARGS) as agent:
        agent.wait_log(r"device: cpu, ")
        assert "chose the CPU" not in agent.log()


@A.test
def cuda_serves_on_a_gpu():
    if not GPU:
        return
    for value in ("cuda", "auto"):
        with A.Agent("--device", value, *A.TINY_ARGS) as agent:
            agent.wait_log(r"device: cuda, .*\(sm_\d+, device 0\)")
            assert agent.serving()
    rc, out = run([A.GENERATE, "--model", A.TINY, "--prompt", "hi", "--max-tokens", "4",
                   "--device", "cuda"])
    assert rc == 0 and "device: cuda" in out, f"exit {rc}:\n{out}"


def cleanup():
    shutil.rmtree(TMP, ignore_errors=True)
    return 0


if __name__ == "__main__":
    A.main("test-device", cleanup)
