#!/usr/bin/env python3
"""Hostile adapter and model files (issue 9, findings 2 and 3): symbolic
links that lead out of the allowed root are refused like a path outside it
(and quote nothing of the file they point at), and a FIFO where a file
should be is refused at once, through the API, in a watched --lora-dir and
as --model, instead of blocking a thread for ever. Each API case asserts
the status and error code, and that the agent still answers /health and
serves a completion afterwards.

A module of tests/integration/test-hostile.py; runs alone too."""

import os
import shutil
import signal
import sys
import tempfile
import time

import harness as H

TMP = None
ROOT = None  # --allowed-local-roots of the API agent
LDIR = None  # --lora-dir of the watching agent
_api = None
_dir = None


def _tmp():
    global TMP
    if TMP is None:
        TMP = tempfile.mkdtemp(prefix="lp-hostile-files-")
    return TMP


def _peft(dst):
    return H.copy_adapter(os.path.join(H.TINY_LORAS, "r4-qv"), dst)


def _replace(path, make):
    os.remove(path)
    make(path)


def api_agent():
    global _api, ROOT
    if _api is None:
        ROOT = os.path.join(_tmp(), "root")
        os.makedirs(ROOT)
        outside = _peft(os.path.join(TMP, "outside"))
        _peft(os.path.join(ROOT, "good"))
        # weights that link out of the root, and into it (HF snapshots)
        d = _peft(os.path.join(ROOT, "weights-out"))
        _replace(os.path.join(d, "adapter_model.safetensors"),
                 lambda p: os.symlink(os.path.join(outside, "adapter_model.safetensors"), p))
        d = _peft(os.path.join(ROOT, "weights-in"))
        _replace(os.path.join(d, "adapter_model.safetensors"),
                 lambda p: os.symlink("../good/adapter_model.safetensors", p))
        # a directory of the adapter that links out of the root
        os.symlink(outside, os.path.join(ROOT, "dir-out"))
        d = _peft(os.path.join(ROOT, "passwd"))
        _replace(os.path.join(d, "adapter_config.json"),
                 lambda p: os.symlink("/etc/passwd", p))
        for name, f in (("fifo-config", "adapter_config.json"),
                        ("fifo-weights", "adapter_model.safetensors")):
            d = _peft(os.path.join(ROOT, name))
            _replace(os.path.join(d, f), os.mkfifo)
        d = H.copy_adapter(os.path.join(H.TINY_LORAS, "r8-all-bin"),
                           os.path.join(ROOT, "fifo-bin"))
        _replace(os.path.join(d, "adapter_model.bin"), os.mkfifo)
        _api = H.Agent("--allowed-local-roots", ROOT, *H.TINY_ARGS)
    return _api


def load(a, name, uri, status, code=None):
    got, _, data = a.request("POST", "/v1/loras", {"lora_name": name, "source": {"uri": uri}},
                             admin=True)
    text = data.decode("utf-8", "replace")
    assert got == status, f"{uri}: {got} {text}, want {status}"
    if code is not None:
        assert f'"code":"{code}"' in text.replace(" ", ""), text
    H.assert_healthy(a)
    return text


@H.test
def files_weights_linked_out_of_the_root_is_403_like_a_path_outside():
    a = api_agent()
    outside = load(a, "o", "file://" + os.path.join(TMP, "outside"), 403, "source_refused")
    assert "outside the allowed local roots" in outside, outside
    text = load(a, "o", "file://" + os.path.join(ROOT, "weights-out"), 403, "source_refused")
    assert "leads outside" in text and os.path.join(TMP, "outside") not in text, text
    load(a, "o", "file://" + os.path.join(ROOT, "dir-out"), 403, "source_refused")
    got, _ = a.json("GET", "/v1/loras/o", admin=True)
    assert got == 404, got


@H.test
def files_link_that_stays_in_the_root_loads():
    a = api_agent()
    load(a, "in", "file://" + os.path.join(ROOT, "weights-in"), 201)
    got, _ = a.json("DELETE", "/v1/loras/in", admin=True)
    assert got == 200, got


@H.test
def files_config_linked_to_etc_passwd_is_refused_and_quotes_nothing():
    a = api_agent()
    text = load(a, "pw", "file://" + os.path.join(ROOT, "passwd"), 403, "source_refused")
    assert "root:" not in text and "/bin/" not in text and "/etc/passwd" not in text, text


@H.test
def files_fifo_adapter_files_are_422_at_once():
    a = api_agent()
    # before the fix the weights' open() blocked the HTTP thread for ever
    for name in ("fifo-config", "fifo-weights", "fifo-bin"):
        load(a, "f", "file://" + os.path.join(ROOT, name), 422, "invalid_adapter")
    text = load(a, "f", "file://" + os.path.join(ROOT, "fifo-weights"), 422)
    assert "not a regular file" in text, text
    load(a, "g", "file://" + os.path.join(ROOT, "good"), 201)


def wait_for(cond, what, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def loaded(a, name):
    got, _ = a.json("GET", "/v1/loras/" + name, admin=True)
    return got == 200


@H.test
def files_lora_dir_with_a_fifo_loads_the_others_and_keeps_watching():
    global _dir, LDIR
    LDIR = os.path.join(_tmp(), "lora-dir")
    os.makedirs(LDIR)
    _peft(os.path.join(LDIR, "a"))
    d = _peft(os.path.join(LDIR, "fifo"))
    _replace(os.path.join(d, "adapter_model.safetensors"), os.mkfifo)
    d = _peft(os.path.join(LDIR, "linkout"))
    outside = _peft(os.path.join(TMP, "outside-dir"))
    _replace(os.path.join(d, "adapter_model.safetensors"),
             lambda p: os.symlink(os.path.join(outside, "adapter_model.safetensors"), p))
    _dir = H.Agent("--lora-dir", LDIR, "--lora-refresh-interval", "0.2", *H.TINY_ARGS)
    assert loaded(_dir, "a"), _dir.log()[-2000:]
    assert not loaded(_dir, "fifo") and not loaded(_dir, "linkout")
    _dir.wait_log(r"skipped adapter 'fifo'.*not a regular file")
    _dir.wait_log(r"skipped adapter 'linkout'.*leads outside")
    # one added later is picked up: the watcher was not blocked
    tmp = _peft(os.path.join(LDIR, ".b-tmp"))
    os.rename(tmp, os.path.join(LDIR, "b"))
    wait_for(lambda: loaded(_dir, "b"), "adapter 'b' from the watched directory")
    H.assert_healthy(_dir)
    rc = _dir.stop(signal.SIGTERM, timeout=60)
    _dir = None
    assert rc == 0, f"agent exited with {rc}"


@H.test
def files_model_that_is_a_fifo_exits_1_at_once():
    fifo = os.path.join(_tmp(), "model.gguf")
    os.mkfifo(fifo)
    rc, out = H.run_agent_once("--model", fifo, "--port", "0", "--admin-port", "0",
                               *H.TINY_ARGS, timeout=60)
    assert rc == 1 and "not a regular file" in out, (rc, out[-2000:])
    H.check_clean(out)


def cleanup():
    failures = 0
    for name, a in (("api", _api), ("lora-dir", _dir)):
        if a is None:
            continue
        failures += H.stop_agent(a, f"hostile_files:shutdown-{name}")
    if TMP:
        shutil.rmtree(TMP, ignore_errors=True)
    return failures


if __name__ == "__main__":
    H.main("hostile_files", cleanup)
