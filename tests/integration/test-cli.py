#!/usr/bin/env python3
"""The command line of loraplane-agent and loraplane-generate, made from one
option table (agent/options.c), and --version of all three programs.

Checks that docs/cli.md is exactly what hack/make-cli-doc.py makes from the
built agent's --help-json, that each program's --help lists every option
the table gives it (with its environment variables) and fits 80 columns,
that --version matches the VERSION file, that an environment variable and
its alias set an option (and a flag wins over both), that vLLM's
`--lora-modules a=x b=y` still takes both words, and that bad values exit 2
with one line naming the flag. Prints one PASS/FAIL line per test."""

import json
import os
import re
import subprocess
import sys

from harness import (AGENT, GENERATE, TINY, TINY_ARGS, TINY_LORAS, Agent, run_agent_once,
                     run_tests, test)

BIN_DIR = os.environ.get("BIN", "bin")
OPERATOR = os.path.join(BIN_DIR, "loraplane-operator")
PROGRAMS = {"loraplane-agent": AGENT, "loraplane-generate": GENERATE}
KEYS = {"name", "flag", "metavar", "type", "min", "max", "choices", "default", "defaults", "env",
        "env_programs", "help", "group", "programs"}


def run(*cmd, env=None):
    full_env = dict(os.environ)
    for k in list(full_env):
        if k.startswith(("LORAPLANE_", "NIM_", "VLLM_")):
            del full_env[k]
    full_env.update(env or {})
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=full_env)
    return p.returncode, p.stdout, p.stderr


def table():
    rc, out, err = run(AGENT, "--help-json")
    assert rc == 0, err
    return json.loads(out)


@test
def help_json_describes_every_option():
    t = table()
    names = [o["name"] for o in t]
    assert len(names) == len(set(names)), names
    for o in t:
        assert set(o) == KEYS, (o["name"], set(o) ^ KEYS)
        assert o["type"] in ("integer", "number", "string", "boolean", "enum", "list",
                             "action"), o
        assert o["programs"] and set(o["programs"]) <= set(PROGRAMS), o
        assert o["help"] and o["flag"].startswith("--" + o["name"]), o
        if o["type"] == "integer":
            assert isinstance(o["min"], int) and isinstance(o["max"], int), o
            assert o["min"] <= o["max"], o
        if o["type"] == "enum":
            assert o["choices"] and o["flag"] == f"--{o['name']} " + "|".join(o["choices"]), o
        # the agent reads LORAPLANE_<NAME> for each of its options
        if "loraplane-agent" in o["programs"] and o["type"] != "action":
            assert o["env"][0] == "LORAPLANE_" + o["name"].upper().replace("-", "_"), o
    by_name = {o["name"]: o for o in t}
    # the aliases users rely on (docs/api.md, DESIGN 3.1)
    for name, alias in (("lora-dir", "NIM_PEFT_SOURCE"), ("max-loras", "NIM_MAX_GPU_LORAS"),
                        ("max-cpu-loras", "NIM_MAX_CPU_LORAS"),
                        ("max-lora-rank", "NIM_MAX_LORA_RANK"),
                        ("lora-refresh-interval", "NIM_PEFT_REFRESH_INTERVAL"),
                        ("allow-runtime-lora-updating", "VLLM_ALLOW_RUNTIME_LORA_UPDATING"),
                        ("lora-cache-dir", "LORAPLANE_LORA_CACHE")):
        assert alias in by_name[name]["env"], (name, by_name[name]["env"])
    assert by_name["port"]["min"] == 0 and by_name["port"]["max"] == 65535
    assert by_name["device"]["defaults"] == {"loraplane-agent": "auto",
                                             "loraplane-generate": "cpu"}
    # both programs print the same table
    rc, out, err = run(GENERATE, "--help-json")
    assert rc == 0 and json.loads(out) == t, err


@test
def docs_cli_md_is_generated():
    p = subprocess.run([sys.executable, "hack/make-cli-doc.py", "--agent", AGENT],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    with open("docs/cli.md", encoding="utf-8") as f:
        have = f.read()
    assert have == p.stdout, ("docs/cli.md differs from what hack/make-cli-doc.py makes: run "
                              "'python3 hack/make-cli-doc.py -o docs/cli.md'")
    for o in table():
        assert f"`{o['flag'].replace('|', chr(92) + '|')}`" in have, o["flag"]


@test
def help_lists_every_option_with_its_environment():
    t = table()
    for prog, path in PROGRAMS.items():
        rc, out, err = run(path, "--help")
        assert rc == 0 and not err, (prog, rc, err)
        assert out.startswith("usage: " + prog), out[:200]
        long_lines = [line for line in out.splitlines() if len(line) > 80]
        assert not long_lines, (prog, long_lines)
        flags = set(re.findall(r"^  --([a-z0-9-]+)", out, re.M))
        mine = {o["name"] for o in t if prog in o["programs"]}
        assert flags == mine, (prog, "missing", mine - flags, "extra", flags - mine)
        for o in t:
            if prog in o["env_programs"]:
                for name in o["env"]:
                    assert name in out, (prog, o["name"], name)
    rc, out, _ = run(AGENT, "--help")
    assert "loraplane-agent fetch --help" in out, out[:400]
    # generate reads LORAPLANE_MODEL and no other variable
    rc, out, _ = run(GENERATE, "--help")
    assert re.findall(r"\b(?:LORAPLANE|NIM|VLLM)_[A-Z_]+", out) == ["LORAPLANE_MODEL"] * 2, out


@test
def version_of_all_three_programs():
    with open("VERSION", encoding="utf-8") as f:
        version = f.read().strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    with open("common/version.h", encoding="utf-8") as f:
        assert f'#define LP_VERSION "{version}"' in f.read(), "common/version.h's fallback"
    for prog, path in (*PROGRAMS.items(), ("loraplane-operator", OPERATOR)):
        rc, out, err = run(path, "--version")
        assert rc == 0, (prog, rc, err)
        assert re.fullmatch(re.escape(f"{prog} {version}") + r"( \(git [0-9a-z.-]+\))?\n",
                            out), (prog, out)


@test
def environment_variable_and_alias_set_options():
    # LORAPLANE_<FLAG> and NIM's alias, each seen in the startup log
    env = {"LORAPLANE_MAX_CPU_LORAS": "5", "NIM_MAX_GPU_LORAS": "3"}
    with Agent(*TINY_ARGS, env=env) as a:
        a.wait_log(r"adapters: 3 device slots, 5 in host memory")
    # the first variable set wins over the alias, and a flag over both
    env = {"LORAPLANE_MAX_LORAS": "2", "NIM_MAX_GPU_LORAS": "3", "LORAPLANE_PORT": "bogus"}
    with Agent(*TINY_ARGS, "--max-cpu-loras", "4", env=env) as a:
        a.wait_log(r"adapters: 2 device slots, 4 in host memory")
    with Agent(*TINY_ARGS, "--max-loras", "1", "--max-cpu-loras", "4", env=env) as a:
        a.wait_log(r"adapters: 1 device slots, 4 in host memory")
    # a flag read from the environment (VLLM_...) turns the public routes on
    with Agent(*TINY_ARGS, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}) as a:
        a.wait_log(r"runtime lora updating on the api port")
    with Agent(*TINY_ARGS, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "off"}) as a:
        assert "runtime lora updating" not in a.log(), a.log()


@test
def lora_modules_take_the_following_words():
    # both words are adapters: the first that does not exist is the error
    # (exit 1), not an unexpected argument (exit 2)
    rc, out = run_agent_once("--model", TINY, "--port", "0", "--admin-port", "0", *TINY_ARGS,
                             "--lora-modules", "a=/nonexistent/a", "b=/nonexistent/b")
    assert rc == 1 and "adapter 'a'" in out, (rc, out)
    rc, out = run_agent_once("--model", TINY, "--port", "0", "--admin-port", "0", *TINY_ARGS,
                             "--lora-modules", "a=" + os.path.join(TINY_LORAS, "r4-qv"),
                             "b=/nonexistent/b")
    assert rc == 1 and "adapter 'b'" in out and "does not exist" in out, (rc, out)


@test
def bad_values_exit_2_with_one_line():
    cases = [
        (AGENT, ["--model", TINY, "--port", "x"], {},
         "loraplane-agent: '--port' needs an integer in [0, 65535], got 'x'"),
        (AGENT, ["--model", TINY, "--gpu-memory-utilization", "2"], {},
         "loraplane-agent: '--gpu-memory-utilization' needs a number in [0.01, 1], got '2'"),
        (AGENT, ["--model", TINY, "--log-format", "xml"], {},
         "loraplane-agent: '--log-format' must be text or json, got 'xml'"),
        (AGENT, ["--model", TINY, "--kv-cache-dtype", "f8"], {},
         "loraplane-agent: '--kv-cache-dtype' must be auto, float32, float16 or bfloat16, "
         "got 'f8'"),
        (AGENT, ["--model", TINY, "--bogus"], {},
         "loraplane-agent: unknown flag '--bogus' (see --help)"),
        (AGENT, ["--model", TINY, "--allow-base-mismatch=yes"], {},
         "loraplane-agent: '--allow-base-mismatch' takes no value, got 'yes'"),
        (AGENT, ["--model", TINY, "--port"], {}, "loraplane-agent: '--port' needs a value"),
        (AGENT, ["--model", TINY, "extra"], {}, "loraplane-agent: unexpected argument 'extra'"),
        (AGENT, ["--model", TINY], {"NIM_MAX_GPU_LORAS": "0"},
         "loraplane-agent: '--max-loras' needs an integer in [1, 4096], got '0' (from the "
         "environment variable NIM_MAX_GPU_LORAS)"),
        (AGENT, ["--model", TINY], {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "maybe"},
         "loraplane-agent: '--allow-runtime-lora-updating' needs 1, true, yes or on (or 0, "
         "false, no or off), got 'maybe' (from the environment variable "
         "VLLM_ALLOW_RUNTIME_LORA_UPDATING)"),
        (GENERATE, ["--model", TINY, "--prompt", "x", "--max-tokens", "abc"], {},
         "loraplane-generate: '--max-tokens' needs an integer in [1, 16777216], got 'abc'"),
        (GENERATE, ["--model", TINY, "--prompt", "x", "--top-p", "x"], {},
         "loraplane-generate: '--top-p' needs a number, got 'x'"),
        (GENERATE, ["--model", TINY, "--prompt", "x", "--port", "1"], {},
         "loraplane-generate: unknown flag '--port' (see --help)"),
    ]
    for path, args, env, want in cases:
        rc, out, err = run(path, *args, env=env)
        assert rc == 2, (args, env, rc, err)
        assert err.splitlines()[0] == want, (args, env, err)
        assert not out, (args, out)
    # a value from the environment that a flag replaces is not read
    rc, out, err = run(AGENT, "--model", TINY, "--port", "x", env={"LORAPLANE_PORT": "y"})
    assert rc == 2 and "'x'" in err and "'y'" not in err, err


if __name__ == "__main__":
    sys.exit(1 if run_tests("test-cli") else 0)
