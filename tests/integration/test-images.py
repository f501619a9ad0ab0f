#!/usr/bin/env python3
"""The container images of images/*.Dockerfile, checked without building
them (no registry and, usually, no Docker daemon here):

- each Dockerfile is multi-stage, names no `latest` or untagged base, runs
  as a non-root numeric USER (65532:65532, what the chart's
  securityContext expects), exposes the programs' ports, starts the program
  in exec form and carries the OCI labels;
- its runtime stage installs exactly the shared libraries that the
  binaries it copies need: the binaries of this build ($BIN) are read with
  readelf (NEEDED) and ldd (what the dynamic linker loads), each library is
  traced to its Debian package with dpkg -S, and every needed package must
  be installed by the runtime stage or be part of the base image, while
  every installed package must provide some needed library (directly or
  through the libraries' own NEEDED entries), ca-certificates excepted;
- its build stage installs the -dev packages of every library the Makefile
  links the copied programs with (from `make -n`), and nothing of
  hack/deps.sh that only the tests need;
- the CUDA image: its Ubuntu 24.04 package names are the Debian ones
  through an explicit table (Ubuntu's archive cannot be queried here), no
  program needs a CUDA library, libloraplane-cuda.so needs only CUDA
  libraries that NVIDIA's runtime image carries and sits where the
  agent's loader looks for it;
- .dockerignore and `make images` (with a stand-in docker that records
  its arguments, one that is missing and one whose daemon is down);
- the agent as the image runs it: uid 65532, writing only to the two
  directories the chart mounts.

Where a Docker daemon answers, the CPU and operator images are also built
and run; otherwise a SKIP line says why. One PASS/FAIL line per test."""

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

from harness import TINY, run_tests, test

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.chdir(ROOT)
BIN = os.environ.get("BIN", "bin")
PROGRAM = "test-images"
IMAGE_UID = 65532

# What each Dockerfile must produce. "debian": the runtime libraries are
# checked against this machine's Debian 12 packages as they are; "ubuntu":
# through UBUNTU_NAMES.
IMAGES = {
    "agent-cpu": {"distro": "debian", "cuda": "0", "ports": {8000, 8001},
                  "entrypoint": "loraplane-agent", "tag": "loraplane-agent:{v}"},
    "agent-cuda": {"distro": "ubuntu", "cuda": "1", "ports": {8000, 8001},
                   "entrypoint": "loraplane-agent", "tag": "loraplane-agent:{v}-cuda"},
    "operator": {"distro": "debian", "cuda": "0", "ports": {8080, 8081},
                 "entrypoint": "loraplane-operator", "tag": "loraplane-operator:{v}"},
}
IMAGE_REPO = "ghcr.io/loraplane"

# Packages each runtime base image already holds that the programs' libraries
# can reach. Short on purpose: a library package pulled in by an installed
# package's Depends is accepted through dpkg's own dependency data instead.
# - debian:bookworm-slim: every one is in the image's package manifest
#   (rootfs.manifest of the image's build, debuerreotype's
#   docker-debian-artifacts, bookworm/slim), and each is required by an
#   Essential package or by apt (libc6 by all; libgcc-s1 and libstdc++6 by
#   apt; zlib1g, libzstd1 and liblzma5 by dpkg; libpcre2-8-0 by grep).
# - nvidia/cuda:*-runtime-ubuntu24.04: built FROM ubuntu:24.04, whose
#   Essential packages and apt require the same first five (Ubuntu keeps
#   Debian's dependencies of apt, dpkg and grep).
BASE_PACKAGES = {
    "debian:bookworm-slim": {"libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libpcre2-8-0",
                             "libzstd1", "liblzma5"},
    "nvidia/cuda:13.0.0-runtime-ubuntu24.04": {"libc6", "libgcc-s1", "libstdc++6", "zlib1g",
                                               "libpcre2-8-0"},
}
# Installed for something other than a shared library.
NOT_A_LIBRARY = {"ca-certificates": "the TLS trust store of https://, s3:// and hf:// downloads"}

# Debian 12 runtime package -> its Ubuntu 24.04 (noble) name. The 64-bit
# time_t transition renamed some libraries in Ubuntu 24.04 on every
# architecture (libcurl4 -> libcurl4t64, libssl3 -> libssl3t64); the others
# keep their names (packages.ubuntu.com, noble: libcivetweb1 1.16 in
# universe, libjansson4, libyaml-0-2, libpcre2-8-0, zlib1g). The table
# cannot be checked against Ubuntu's archive from here: a package the
# programs come to need that is not in it fails the test until someone adds
# its noble name.
UBUNTU_NAMES = {
    "libc6": "libc6",
    "libgcc-s1": "libgcc-s1",
    "libstdc++6": "libstdc++6",
    "libcivetweb1": "libcivetweb1",
    "libcurl4": "libcurl4t64",
    "libjansson4": "libjansson4",
    "libpcre2-8-0": "libpcre2-8-0",
    "libssl3": "libssl3t64",
    "libyaml-0-2": "libyaml-0-2",
    "zlib1g": "zlib1g",
    "ca-certificates": "ca-certificates",
}

# CUDA libraries NVIDIA's nvidia/cuda:13.0.0-runtime-ubuntu24.04 carries
# (its Dockerfile in NVIDIA's container-images repository, dist/13.0.0/
# ubuntu2404/runtime: FROM the base image, which installs cuda-cudart-13-0,
# then libcublas-13-0 among the runtime libraries) -> the package. The
# driver's libcuda.so.1 is not here: the NVIDIA container toolkit mounts it
# from the node, and cudart (linked statically) opens it itself.
CUDA_RUNTIME_LIBS = {
    "libcudart.so.13": "cuda-cudart-13-0",
    "libcublas.so.13": "libcublas-13-0",
    "libcublasLt.so.13": "libcublas-13-0",
}
CUDA_LIB = re.compile(r"^lib(cuda|cudart|cublas|cublasLt|nvrtc|nvJitLink|cusparse|cufft|curand"
                      r"|cusolver|npp\w*|nccl|nvidia-\w+)[.-]")

# hack/deps.sh's packages that no image build needs (formatting, tests,
# fuzzing, the model download).
NOT_FOR_BUILDS = {"clang-format", "clang", "python3", "python3-pip", "unzip", "curl", "openssl",
                  "libclang-rt-14-dev"}


def sh(*cmd, check=False, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()[-500:]}")
    return p


# ---- Dockerfiles -------------------------------------------------------------


class Stage:
    def __init__(self, image, name):
        self.image = image  # the FROM reference, ARGs substituted
        self.name = name
        self.instrs = []  # (INSTRUCTION, arguments)

    def all(self, kind):
        return [a for k, a in self.instrs if k == kind]


def substitute(text, args):
    def one(m):
        name = m.group(1) or m.group(2)
        if name not in args:
            raise AssertionError(f"'${name}' is used but no ARG gives it a default")
        return args[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, text)


def parse_dockerfile(path):
    """The stages of a Dockerfile, continuation lines joined, comments
    dropped."""
    logical, cur = [], ""
    for raw in open(path, encoding="utf-8").read().splitlines():
        s = raw.strip()
        if s.startswith("#") or (not s and cur):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        if cur.strip():
            logical.append(cur.strip())
        cur = ""
    assert not cur, f"{path}: ends inside a continued line"
    global_args, stages = {}, []
    for line in logical:
        kind, _, rest = line.partition(" ")
        kind, rest = kind.upper(), rest.strip()
        if kind == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(substitute(words[0], global_args), name))
        elif not stages:
            assert kind == "ARG", f"{path}: '{kind}' before the first FROM"
            k, _, v = rest.partition("=")
            global_args[k] = v.strip('"')
        else:
            stages[-1].instrs.append((kind, rest))
    return stages


def apt_packages(stage):
    """The packages of every `apt-get install` in a stage's RUN lines."""
    pkgs = []
    for run in stage.all("RUN"):
        for part in re.split(r"&&|;|\|\|?", run):
            words = shlex.split(part)
            if "apt-get" in words and "install" in words[words.index("apt-get"):]:
                after = words[words.index("install", words.index("apt-get")) + 1:]
                pkgs += [w for w in after if not w.startswith("-")]
    return pkgs


def copies_from(stage, stages):
    """(source, destination) of each COPY --from=<an earlier stage>."""
    names = {s.name for s in stages if s.name}
    out = []
    for c in stage.all("COPY"):
        words = shlex.split(c)
        opts = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        src = [o.split("=", 1)[1] for o in opts if o.startswith("--from=")]
        assert src, f"COPY {c}: the runtime stage copies only from the build stage"
        assert src[0] in names, f"COPY {c}: '{src[0]}' is not a stage of this Dockerfile"
        for p in paths[:-1]:
            out.append((p, paths[-1]))
    return out


def dest_path(src, dest):
    return os.path.join(dest, os.path.basename(src)) if dest.endswith("/") else dest


def dockerfile(name):
    path = f"images/{name}.Dockerfile"
    assert os.path.isfile(path), f"'{path}' is missing"
    return parse_dockerfile(path)


# ---- libraries and packages --------------------------------------------------

_owner_cache = {}


def needed(path):
    out = sh("readelf", "-d", path, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def ldd(path):
    """soname -> the file the dynamic linker loads (None: not found), for
    the whole closure."""
    out = sh("ldd", path, check=True).stdout
    libs = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) => (not found|\S+)", line)
        if m:
            libs[m.group(1)] = None if m.group(2) == "not found" else m.group(2)
        else:
            m = re.match(r"\s*(/\S+) \(0x", line)  # the loader itself
            if m:
                libs[os.path.basename(m.group(1))] = m.group(1)
    return libs


def owner(path):
    """The Debian package that installed a file, trying the paths a merged
    /usr gives it (dpkg knows one of /lib/... and /usr/lib/...)."""
    if path in _owner_cache:
        return _owner_cache[path]
    cands = []
    for p in (path, os.path.normpath(path), os.path.realpath(path)):
        cands.append(p)
        if p.startswith("/usr/lib/"):
            cands.append(p[len("/usr"):])
        elif p.startswith(("/lib/", "/lib64/")):
            cands.append("/usr" + p)
    for c in dict.fromkeys(cands):
        p = sh("dpkg", "-S", c)
        for line in p.stdout.splitlines():
            if ": " in line and not line.startswith("diversion"):
                pkg = line.split(": ", 1)[0].split(",")[0].strip().split(":")[0]
                _owner_cache[path] = pkg
                return pkg
    raise AssertionError(f"no Debian package owns '{path}' (dpkg -S)")


def depends_closure(pkgs):
    """Every package apt installs with these (Depends and Pre-Depends,
    every alternative), from this machine's dpkg database."""
    seen, todo = set(), list(pkgs)
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        q = sh("dpkg-query", "-W", "-f=${Depends}, ${Pre-Depends}", p)
        if q.returncode != 0:
            continue
        for alt in q.stdout.split(","):
            for name in alt.split("|"):
                name = name.strip().split(" ")[0].split(":")[0]
                if name:
                    todo.append(name)
    return seen


def binary_libraries(paths):
    """(direct, closure): package -> the sonames that bring it in, for the
    binaries' NEEDED entries and for everything the linker loads for them.
    CUDA libraries are left out (checked by their own table)."""
    direct, closure = {}, {}
    for path in paths:
        loaded = ldd(path)
        for so in needed(path):
            if CUDA_LIB.match(so):
                continue
            assert loaded.get(so), f"'{path}' needs '{so}', which this machine does not have"
            direct.setdefault(owner(loaded[so]), set()).add(so)
        for so, file in loaded.items():
            if CUDA_LIB.match(so) or file is None or so.startswith("linux-vdso"):
                continue
            closure.setdefault(owner(file), set()).add(so)
    return direct, closure


def built(src):
    """The file of this build that a COPY source path names."""
    path = os.path.join(BIN, os.path.basename(src))
    return path if os.path.isfile(path) else None


# ---- per-image checks --------------------------------------------------------


def check_shape(name):
    spec = IMAGES[name]
    stages = dockerfile(name)
    assert len(stages) >= 2, f"{name}: one stage; the image must be built in a build stage"
    run, build = stages[-1], stages[:-1]
    for s in stages:
        ref = s.image
        if any(ref == b.name for b in stages if b.name):
            continue
        tag = ref.rsplit("/", 1)[-1].partition(":")[2].partition("@")[0]
        assert tag and tag != "latest", f"{name}: 'FROM {ref}' has no fixed tag"
    assert run.image not in {b.image for b in build}, \
        f"{name}: the runtime stage is FROM the build image '{run.image}'"
    copies = copies_from(run, stages)
    assert copies, f"{name}: the runtime stage copies nothing from the build stage"

    users = run.all("USER")
    assert users, f"{name}: no USER in the runtime stage: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER '{users[-1]}' is not a numeric non-zero uid"
    assert gid.isdigit() and int(gid) != 0, f"{name}: USER '{users[-1]}' has no non-zero numeric gid"
    assert (int(uid), int(gid)) == (IMAGE_UID, IMAGE_UID), \
        f"{name}: USER {users[-1]}, the chart runs as {IMAGE_UID}:{IMAGE_UID}"

    ports = {int(p.split("/")[0]) for e in run.all("EXPOSE") for p in e.split()}
    assert ports == spec["ports"], f"{name}: EXPOSE {sorted(ports)}, want {sorted(spec['ports'])}"

    eps = run.all("ENTRYPOINT")
    assert len(eps) == 1, f"{name}: {len(eps)} ENTRYPOINT lines"
    try:
        ep = json.loads(eps[0])
    except ValueError:
        raise AssertionError(f"{name}: ENTRYPOINT {eps[0]} is not in exec form (a JSON array)")
    assert ep == [spec["entrypoint"]], f"{name}: ENTRYPOINT {ep}, want [\"{spec['entrypoint']}\"]"
    dests = {dest_path(s, d) for s, d in copies}
    assert f"/usr/local/bin/{spec['entrypoint']}" in dests, \
        f"{name}: {spec['entrypoint']} is not copied to /usr/local/bin (copies: {sorted(dests)})"

    labels = " ".join(run.all("LABEL"))
    for key in ("source", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, \
            f"{name}: no org.opencontainers.image.{key} label"
    assert "${VERSION}" in labels or "$VERSION" in labels, \
        f"{name}: the version label does not come from ARG VERSION (make images sets it)"


def check_runtime_libraries(name):
    spec = IMAGES[name]
    stages = dockerfile(name)
    run = stages[-1]
    installed = apt_packages(run)
    assert installed, f"{name}: the runtime stage installs no package"
    assert len(set(installed)) == len(installed), f"{name}: a package is listed twice: {installed}"
    base = BASE_PACKAGES.get(run.image)
    assert base is not None, f"{name}: no package list for the base '{run.image}' in this test"

    files = []
    for src, _ in copies_from(run, stages):
        if os.path.basename(src) == "libloraplane-cuda.so":
            continue  # CUDA's own table: test agent_cuda_shared_object
        path = built(src)
        assert path, f"{name}: '{src}' is copied but '{BIN}/{os.path.basename(src)}' is not built"
        files.append(path)
    so = [src for src, _ in copies_from(run, stages) if src.endswith("libloraplane-cuda.so")]
    if so and built(so[0]):
        files.append(built(so[0]))
    sanitized = [f for f in files if any(re.match(r"lib[a-z]*san\.so", so) for so in needed(f))]
    if sanitized:
        print(f"SKIP {PROGRAM}: {name}: {sanitized} are sanitizer builds (make asan): their "
              f"libraries are not those of an image's build")
        return
    direct, closure = binary_libraries(files)

    if spec["distro"] == "ubuntu":
        for p in installed:
            renamed = UBUNTU_NAMES.get(p, p)
            assert renamed == p, f"{name}: '{p}' is Debian's name; Ubuntu 24.04 calls it '{renamed}'"
            assert p in UBUNTU_NAMES.values(), (
                f"{name}: '{p}' is not in the test's Debian -> Ubuntu 24.04 table "
                f"(UBUNTU_NAMES): add it with the Debian package it stands for")
        for p in direct:
            assert p in UBUNTU_NAMES, (f"{name}: the programs need the Debian package '{p}' "
                                       f"({', '.join(sorted(direct[p]))}), which has no "
                                       f"Ubuntu 24.04 name in UBUNTU_NAMES")
        to_debian = {u: d for d, u in UBUNTU_NAMES.items()}
        installed_deb = {to_debian[p] for p in installed}
        base_deb = {to_debian.get(p, p) for p in base}
        # Ubuntu's packages of these libraries depend on other packages
        # than Debian's (libcurl4t64 on libssh-4, not libssh2-1): apt's
        # closure is only checked on Debian.
        pulled = installed_deb | base_deb
    else:
        installed_deb = set(installed)
        base_deb = base
        pulled = depends_closure(installed_deb | base_deb)

    missing = sorted(p for p in direct if p not in installed_deb and p not in base_deb)
    assert not missing, (f"{name}: the runtime stage does not install "
                         + "; ".join(f"{p} (for {', '.join(sorted(direct[p]))})" for p in missing))
    if spec["distro"] == "debian":
        unreached = sorted(p for p in closure if p not in pulled)
        assert not unreached, (f"{name}: libraries the programs load come from packages that "
                               f"neither the base image nor the installed packages bring: "
                               + "; ".join(f"{p} ({', '.join(sorted(closure[p]))})"
                                           for p in unreached))
    useless = sorted(p for p in installed_deb if p not in closure and p not in NOT_A_LIBRARY)
    assert not useless, (f"{name}: the runtime stage installs {useless}, which provide no library "
                         f"the programs load (needed: {', '.join(sorted(closure))})")


def link_libraries(name, target):
    """The -l libraries of the Makefile's link of one program, from make -n
    in a scratch build directory."""
    cuda = IMAGES[name]["cuda"]
    tmp = tempfile.mkdtemp(prefix="test-images-")
    try:
        env = {k: v for k, v in os.environ.items()
               if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "BUILD", "BIN")}
        p = sh("make", "-n", "-B", f"CUDA={cuda}", "NVCC=true", f"BUILD={tmp}/b",
               f"BIN={tmp}/b/bin", f"{tmp}/b/bin/{target}", env=env)
        assert p.returncode == 0, f"make -n {target}: {p.stderr.strip()[-400:]}"
        links = [line for line in p.stdout.splitlines()
                 if re.search(rf"-o {re.escape(tmp)}/b/bin/{re.escape(target)}(\s|$)", line)]
        assert links, f"make -n printed no link of {target}"
        return sorted(set(re.findall(r"(?:^|\s)-l(\S+)", links[-1])))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dev_package(lib):
    """The package holding the file the linker uses for -l<lib>."""
    for ext in (".so", ".a"):
        p = sh(os.environ.get("CC", "cc"), f"-print-file-name=lib{lib}{ext}").stdout.strip()
        if os.path.isabs(p) and os.path.exists(p):
            return owner(os.path.normpath(p))
    return None


def deps_sh_packages():
    text = open("hack/deps.sh", encoding="utf-8").read()
    m = re.search(r"DEB_PACKAGES=\(([^)]*)\)", text)
    assert m, "hack/deps.sh has no DEB_PACKAGES=(...)"
    return set(m.group(1).split())


def check_build_stage(name):
    spec = IMAGES[name]
    stages = dockerfile(name)
    run, build = stages[-1], stages[:-1]
    pkgs = set(p for s in build for p in apt_packages(s))
    allowed = deps_sh_packages()
    extra = sorted(pkgs - allowed)
    assert not extra, f"{name}: the build stage installs {extra}, which hack/deps.sh does not"
    idle = sorted(pkgs & NOT_FOR_BUILDS)
    assert not idle, f"{name}: the build stage installs {idle}, which no build needs"

    makes = [shlex.split(r) for s in build for r in s.all("RUN") if re.match(r"make\b", r)]
    assert len(makes) == 1, f"{name}: {len(makes)} make commands in the build stage"
    words = makes[0]
    assert f"CUDA={spec['cuda']}" in words, f"{name}: the build does not say CUDA={spec['cuda']}"
    targets = {w for w in words[1:] if not w.startswith("-") and "=" not in w}
    have_toolkit = any(s.image.startswith("nvidia/cuda:") and "-devel-" in s.image for s in build)
    covered = depends_closure(pkgs)
    for src, _ in copies_from(run, stages):
        base = os.path.basename(src)
        assert src.startswith("/src/bin/"), f"{name}: copies '{src}', not a file of /src/bin/"
        assert f"bin/{base}" in targets, f"{name}: '{src}' is copied but make builds {sorted(targets)}"
        for lib in link_libraries(name, base):
            if lib in ("cudart_static", "cublas", "cublasLt"):
                assert have_toolkit, f"{name}: {base} links -l{lib} but the build stage has no CUDA toolkit"
                continue
            dev = dev_package(lib)
            assert dev, f"{name}: cannot find lib{lib}.so or .a here to check the build stage"
            assert dev in covered, (f"{name}: {base} links -l{lib} ({dev}) but the build stage "
                                    f"installs neither {dev} nor a package that brings it")
    workdirs = [w for s in build for w in s.all("WORKDIR")]
    assert workdirs and workdirs[-1] == "/src", f"{name}: the build stage does not work in /src"


for _name in IMAGES:
    for _check, _what in ((check_shape, "shape"), (check_runtime_libraries, "runtime_libraries"),
                          (check_build_stage, "build_stage")):
        def _t(check=_check, name=_name):
            check(name)
        _t.__name__ = f"{_name.replace('-', '_')}_{_what}"
        test(_t)


@test
def programs_need_no_cuda_library():
    """Every program an image copies starts on a node without CUDA."""
    checked = 0
    for name in IMAGES:
        stages = dockerfile(name)
        for src, _ in copies_from(stages[-1], stages):
            if src.endswith(".so"):
                continue
            path = built(src)
            assert path, f"'{BIN}/{os.path.basename(src)}' is not built"
            bad = [so for so in ldd(path) if CUDA_LIB.match(so)]
            assert not bad, f"{path} loads {bad}"
            checked += 1
    assert checked >= 5, f"only {checked} programs checked"


@test
def agent_cuda_shared_object():
    stages = dockerfile("agent-cuda")
    copies = copies_from(stages[-1], stages)
    sos = [(s, d) for s, d in copies if os.path.basename(s) == "libloraplane-cuda.so"]
    assert len(sos) == 1, "the CUDA image does not copy libloraplane-cuda.so"
    agent = [dest_path(s, d) for s, d in copies if os.path.basename(s) == "loraplane-agent"]
    assert agent, "the CUDA image does not copy loraplane-agent"
    agent_dir = os.path.dirname(agent[0])
    so_path = dest_path(*sos[0])
    # kernels/cuda-loader.c: next to the program, or ../lib/loraplane/
    where = {os.path.join(agent_dir, "libloraplane-cuda.so"),
             os.path.normpath(os.path.join(agent_dir, "../lib/loraplane/libloraplane-cuda.so"))}
    assert so_path in where, f"'{so_path}' is not where the loader looks ({sorted(where)})"
    loader = open("kernels/cuda-loader.c", encoding="utf-8").read()
    assert '"%s/../lib/loraplane/%s"' in loader, "kernels/cuda-loader.c no longer looks in ../lib/loraplane"
    envs = " ".join(stages[-1].all("ENV"))
    assert "LORAPLANE_CUDA_LIB" not in envs, "the image sets LORAPLANE_CUDA_LIB; the loader's own path is enough"

    path = os.path.join(BIN, "libloraplane-cuda.so")
    if not os.path.isfile(path):
        print(f"SKIP {PROGRAM}: '{path}' is not built (make CUDA=1): its libraries are not checked")
        return
    libs = needed(path)
    cuda = [so for so in libs if CUDA_LIB.match(so)]
    assert cuda, f"{path} needs no CUDA library at all: {libs}"
    unknown = [so for so in cuda if so not in CUDA_RUNTIME_LIBS]
    assert not unknown, (f"{path} needs {unknown}, which NVIDIA's runtime image is not known to "
                         f"carry ({sorted(CUDA_RUNTIME_LIBS)})")
    dyn = sh("readelf", "-d", path, check=True).stdout
    assert "RPATH" not in dyn and "RUNPATH" not in dyn, f"{path} has an rpath"


@test
def dockerignore_leaves_out_build_output():
    assert os.path.isfile(".dockerignore"), "no .dockerignore"
    lines = {line.strip().rstrip("/") for line in open(".dockerignore", encoding="utf-8")
             if line.strip() and not line.startswith("#")}
    for want in (".git", "bin", "build", "build-*", "models"):
        assert want in lines, f".dockerignore does not leave out '{want}'"
    # nothing the builds need is left out
    for need in ("Makefile", "common", "kernels", "agent", "operator"):
        assert need not in lines, f".dockerignore leaves out '{need}', which the build needs"


def make(*args, env=None):
    e = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL",
                                                            "VERSION", "IMAGE_REPO", "DOCKER")}
    e.update(env or {})
    return sh("make", "--no-print-directory", *args, env=e, timeout=120)


def expected_version():
    if os.path.isfile("VERSION"):
        return open("VERSION", encoding="utf-8").read().strip()
    return "0.1.0"


@test
def make_images_builds_the_three_images():
    tmp = tempfile.mkdtemp(prefix="test-images-")
    try:
        log = os.path.join(tmp, "calls")
        fake = os.path.join(tmp, "docker")
        with open(fake, "w") as f:
            f.write(f'#!/bin/sh\nprintf "%s\\n" "$*" >>{shlex.quote(log)}\n')
        os.chmod(fake, 0o755)
        p = make("images", f"DOCKER={fake}")
        assert p.returncode == 0, f"make images: exit {p.returncode}: {p.stderr.strip()[-400:]}"
        calls = open(log).read().splitlines()
        v = expected_version()
        assert calls[0] == "info", f"make images did not ask the daemon first: {calls}"
        builds = [shlex.split(c) for c in calls[1:]]
        assert len(builds) == 3, f"{len(builds)} docker calls after info: {calls}"
        got = {}
        for b in builds:
            assert b[0] == "build" and b[-1] == ".", f"not a build of the source tree: {b}"
            got[b[b.index("-f") + 1]] = (b[b.index("-t") + 1], b[b.index("--build-arg") + 1])
        for name, spec in IMAGES.items():
            want = f"{IMAGE_REPO}/" + spec["tag"].format(v=v)
            assert got.get(f"images/{name}.Dockerfile") == (want, f"VERSION={v}"), \
                f"images/{name}.Dockerfile: built as {got.get(f'images/{name}.Dockerfile')}, want {want}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@test
def make_images_without_docker_says_so():
    tmp = tempfile.mkdtemp(prefix="test-images-")
    try:
        p = make("images", f"DOCKER={tmp}/no/docker")
        assert p.returncode != 0, "make images succeeded without docker"
        assert f"no '{tmp}/no/docker' command" in p.stderr, f"stderr: {p.stderr.strip()[-300:]}"

        down = os.path.join(tmp, "docker")
        with open(down, "w") as f:
            f.write("#!/bin/sh\necho 'Cannot connect to the Docker daemon at unix:///x.sock.' >&2\n"
                    "exit 1\n")
        os.chmod(down, 0o755)
        p = make("images", f"DOCKER={down}")
        assert p.returncode != 0, "make images succeeded with the daemon down"
        assert "the Docker daemon does not answer" in p.stderr and "unix:///x.sock" in p.stderr, \
            f"stderr: {p.stderr.strip()[-300:]}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- the agent as the image runs it -------------------------------------------


def _as_image_user():
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    os.setgroups([])
    os.setgid(IMAGE_UID)
    os.setuid(IMAGE_UID)


def start_as_image_user(args, env):
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         errors="replace", env=env, cwd="/", preexec_fn=_as_image_user)
    lines, cond = [], threading.Condition()

    def read():
        for line in p.stdout:
            with cond:
                lines.append(line.rstrip("\n"))
                cond.notify_all()
        with cond:
            cond.notify_all()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return p, lines, cond, t


def wait_line(p, lines, cond, reader, rx, timeout):
    deadline = time.time() + timeout
    with cond:
        while True:
            for line in lines:
                if re.search(rx, line):
                    return line
            left = deadline - time.time()
            if left <= 0 or (p.poll() is not None and not reader.is_alive()):
                raise AssertionError(f"no line matching {rx!r}; output:\n" + "\n".join(lines[-20:]))
            cond.wait(min(left, 0.5))


def emptydir(parent, name):
    """A directory as Kubernetes makes an emptyDir: root's, mode 0777."""
    d = os.path.join(parent, name)
    os.mkdir(d)
    os.chmod(d, 0o777)
    return d


@test
def agent_runs_as_image_user_with_the_charts_volumes():
    if os.geteuid() != 0:
        print(f"SKIP {PROGRAM}: not root: cannot run the agent as uid {IMAGE_UID}")
        return
    built_agent = os.path.join(BIN, "loraplane-agent")
    assert os.path.isfile(built_agent), f"'{built_agent}' is not built"
    top = tempfile.mkdtemp(prefix="test-images-")
    os.chmod(top, 0o755)
    try:
        # the program and the model where uid 65532 can read them, whatever
        # the permissions of the checkout; root's and read-only, as in the image
        agent = os.path.join(top, "loraplane-agent")
        shutil.copy(built_agent, agent)
        model = os.path.join(top, "model")
        shutil.copytree(TINY, model)
        for d, _, fs in os.walk(model):
            os.chmod(d, 0o755)
            for f in fs:
                os.chmod(os.path.join(d, f), 0o644)
        tmp, cache = emptydir(top, "tmp"), emptydir(top, "cache")
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "TMPDIR": tmp, "HOME": "/nonexistent"}
        base = [agent, "--model", model, "--device", "cpu", "--host", "127.0.0.1", "--port", "0",
                "--admin-port", "0", "--threads", "1", "--kv-cache-bytes", str(8 << 20)]

        # the emptyDir itself is root's: refused, with the reason
        p, lines, cond, r = start_as_image_user([*base, "--lora-cache-dir", cache], env)
        try:
            p.wait(90)
        except subprocess.TimeoutExpired:
            p.kill()
            raise AssertionError("the agent kept running with a cache directory owned by root")
        r.join(5)
        assert p.returncode != 0, "the agent accepted a cache directory owned by root"
        assert any(f"is owned by uid 0, not by this agent's uid {IMAGE_UID}" in ln for ln in lines), \
            "no clear error for a root-owned cache directory:\n" + "\n".join(lines[-10:])

        # a directory inside it, as the chart passes: created 0700, served
        adapters = os.path.join(cache, "adapters")
        p, lines, cond, r = start_as_image_user([*base, "--lora-cache-dir", adapters], env)
        try:
            wait_line(p, lines, cond, r, r'( ready$|"msg":"ready"\}$)', 120)
            st = os.stat(adapters)
            assert st.st_uid == IMAGE_UID and stat.S_IMODE(st.st_mode) == 0o700, \
                f"{adapters}: uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"
        finally:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        assert p.returncode == 0, f"the agent exited {p.returncode} on SIGTERM"
    finally:
        shutil.rmtree(top, ignore_errors=True)


# ---- a real build, where a daemon answers -------------------------------------


@test
def docker_build_where_a_daemon_answers():
    docker = shutil.which("docker")
    if not docker:
        print(f"SKIP {PROGRAM}: no docker command: the images are checked statically only")
        return
    info = sh(docker, "info", timeout=60)
    if info.returncode != 0:
        why = (info.stderr.strip().splitlines() or ["no reason given"])[-1]
        print(f"SKIP {PROGRAM}: the Docker daemon does not answer ({why}): the images are "
              f"checked statically only")
        return
    # the CUDA image needs NVIDIA's multi-GB toolkit image: not built here
    for name in ("agent-cpu", "operator"):
        tag = f"loraplane-test/{name}:test"
        b = sh(docker, "build", "-q", "-f", f"images/{name}.Dockerfile", "-t", tag, ".",
               timeout=1800)
        assert b.returncode == 0, f"docker build {name}: {b.stderr.strip()[-800:]}"
        prog = IMAGES[name]["entrypoint"]
        r = sh(docker, "run", "--rm", "--read-only", tag, "--help", timeout=120)
        assert r.returncode == 0 and "usage:" in (r.stdout + r.stderr), \
            f"{tag} --help: exit {r.returncode}: {(r.stdout + r.stderr)[-400:]}"
        r = sh(docker, "run", "--rm", "--entrypoint", "ldd", tag, f"/usr/local/bin/{prog}",
               timeout=120)
        assert r.returncode == 0 and "not found" not in r.stdout, f"{tag}: ldd: {r.stdout[-600:]}"
        r = sh(docker, "run", "--rm", "--entrypoint", "id", tag, "-u", timeout=120)
        assert r.stdout.strip() == str(IMAGE_UID), f"{tag} runs as uid {r.stdout.strip()}"


if __name__ == "__main__":
    sys.exit(1 if run_tests(PROGRAM) else 0)
