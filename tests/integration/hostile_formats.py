#!/usr/bin/env python3
"""Hostile adapter contents through a real agent's POST /v1/loras (issue 9,
findings 6, 8, 11, 12): a deeply nested model_config.yaml, catastrophic
regular expressions in adapter_config.json, an adapter_config.json over
1 MiB, finite but absurd weights, and .nemo members that leave the archive
or are links. Each is a 422 invalid_adapter whose message says why, and the
agent stays healthy. Imported by test-hostile.py; runs alone too."""

import io
import json
import os
import shutil
import struct
import sys
import tarfile
import tempfile

import harness as H

_agent = None
_root = None


def agent():
    global _agent, _root
    if _agent is None:
        _root = os.path.realpath(tempfile.mkdtemp(prefix="lp-hostile-formats-"))
        _agent = H.Agent("--allowed-local-roots", _root, *H.TINY_ARGS)
    return _agent


def fresh(name):
    """A new path below the allowed root."""
    agent()
    path = os.path.join(_root, name)
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
    return path


def peft_copy(name, config=None):
    """tiny/r4-qv copied below the root, its config updated with config."""
    d = H.copy_adapter(os.path.join(H.TINY_LORAS, "r4-qv"), fresh(name))
    if config:
        with open(os.path.join(d, "adapter_config.json")) as f:
            cfg = json.load(f)
        cfg.update(config)
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump(cfg, f)
    return d


def nemo_members():
    """(model_config.yaml, model_weights.ckpt) of tiny/r16-attn.nemo."""
    with tarfile.open(os.path.join(H.TINY_LORAS, "r16-attn.nemo")) as t:
        return (t.extractfile("./model_config.yaml").read(),
                t.extractfile("./model_weights.ckpt").read())


def write_nemo(path, cfg_name, cfg, cfg_type=tarfile.REGTYPE):
    yaml, ckpt = nemo_members()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo(cfg_name)
        info.type = cfg_type
        if cfg_type == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
            t.addfile(info)
        else:
            info.size = len(cfg if cfg is not None else yaml)
            t.addfile(info, io.BytesIO(cfg if cfg is not None else yaml))
        info = tarfile.TarInfo("./model_weights.ckpt")
        info.size = len(ckpt)
        t.addfile(info, io.BytesIO(ckpt))
    return path


def load_refused(path, want):
    """POST /v1/loras of path: 422 invalid_adapter with want in the message;
    then the agent is still healthy and serving."""
    a = agent()
    status, obj = a.json("POST", "/v1/loras",
                         {"lora_name": "hostile", "source": {"uri": "file://" + path}},
                         admin=True)
    assert status == 422, (status, obj)
    assert obj["error"]["code"] == "invalid_adapter", obj
    assert obj["error"]["type"] == "invalid_request_error", obj
    assert want in obj["error"]["message"], (want, obj)
    assert a.request("GET", "/health")[0] == 200
    assert a.serving(), "the agent no longer serves a completion"
    status, obj = a.json("GET", "/v1/models")
    assert status == 200 and all(m["id"] != "hostile" for m in obj["data"]), obj


@H.test
def formats_deep_yaml_is_refused_by_depth():
    yaml, _ = nemo_members()
    deep = yaml + b"deep: " + b"[" * 2000000 + b"]" * 2000000 + b"\n"
    path = write_nemo(fresh("deep.nemo"), "./model_config.yaml", deep)
    load_refused(path, "model_config.yaml nests deeper than 64 levels")


@H.test
def formats_catastrophic_regex_hits_the_match_limit():
    d = peft_copy("regex-rank", {"rank_pattern": {"(([a-z_.0-9])+)+[A-Z]": 4}})
    load_refused(d, "rank_pattern '(([a-z_.0-9])+)+[A-Z]' is too costly to match against")
    d = peft_copy("regex-target", {"target_modules": "(([a-z_.0-9])+)+[A-Z]|.*[.][qv]_proj"})
    load_refused(d, "target_modules '(([a-z_.0-9])+)+[A-Z]|.*[.][qv]_proj' is too costly")


@H.test
def formats_too_many_pattern_keys():
    keys = {"layers.%d.self_attn.q_proj" % i: 4 for i in range(257)}
    d = peft_copy("many-keys", {"alpha_pattern": keys})
    load_refused(d, "'alpha_pattern' has 257 keys, more than 256")


@H.test
def formats_config_over_1mib_is_422():
    d = peft_copy("big-config")
    cfg = os.path.join(d, "adapter_config.json")
    with open(cfg, "ab") as f:
        f.write(b" " * (1 << 20))
    load_refused(d, "adapter_config.json' is larger than the limit of 1048576 bytes")


@H.test
def formats_absurd_weights_are_refused():
    for factor, name in ((1e18, "absurd-b"), (1e30, "absurd-a")):
        d = peft_copy(name)
        st = os.path.join(d, "adapter_model.safetensors")
        with open(st, "rb") as f:
            raw = bytearray(f.read())
        n = struct.unpack("<Q", raw[:8])[0]
        hdr = json.loads(raw[8:8 + n])
        which = "lora_B" if factor < 1e20 else "lora_A"
        key = next(k for k in sorted(hdr) if which in k and "layers.1.self_attn.v_proj" in k)
        a, b = hdr[key]["data_offsets"]
        vals = struct.unpack("<%df" % ((b - a) // 4), raw[8 + n + a:8 + n + b])
        # keeps every value finite in f32 (|v| < 1 times 1e30 or 1e18)
        raw[8 + n + a:8 + n + b] = struct.pack("<%df" % len(vals), *(v * factor for v in vals))
        with open(st, "wb") as f:
            f.write(raw)
        load_refused(d, "layer 1 'v_proj': scale * |B| * |A|")
        load_refused(d, "over the limit of 100000: the weights are absurd")


@H.test
def formats_nemo_members_outside_or_linked_are_422():
    for member, kind, want in (
            ("../model_config.yaml", tarfile.REGTYPE,
             "tar member '../model_config.yaml' is an absolute path or leads out of the "
             "archive with '..'"),
            ("/model_config.yaml", tarfile.REGTYPE, "tar member '/model_config.yaml' is an "
             "absolute path"),
            ("./model_config.yaml", tarfile.SYMTYPE,
             "tar member 'model_config.yaml' is a symbolic link")):
        path = write_nemo(fresh("member.nemo"), member, None, kind)
        load_refused(path, want)


def cleanup():
    """Stops the agent; the number of failures found at shutdown."""
    global _agent
    failures = 0
    failures += H.stop_agent(_agent, "hostile_formats:shutdown")
    _agent = None
    if _root:
        shutil.rmtree(_root, ignore_errors=True)
    return failures


if __name__ == "__main__":
    H.main("hostile_formats", cleanup)
