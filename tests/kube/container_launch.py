#!/usr/bin/env python3
"""The part of the kubelet stand-in (tests/kube/kubelet.py) that runs
inside a container's namespaces, as root, just before the container's
process: the kubelet starts

    nsenter --net=/run/netns/POD -- unshare --mount --uts --propagation private -- \\
        python3 -I container_launch.py SPEC.json STATUS_FD

and this program builds the container's root file system in that new
mount namespace, drops privileges and execs the container's command with
exactly the environment the kubelet computed. It reports a failure before
the exec as one line on STATUS_FD and exits 128 (the kubelet then says
StartError); a successful exec closes STATUS_FD (close-on-exec).

The root file system ("the image") is a tmpfs holding:
- an overlay of each host directory named in image_dirs (usr, etc, ...)
  with a writable upper layer in a scratch tmpfs, so the container can
  write to its root (changes vanish with the container), mount points can
  be made anywhere, and the host is never changed;
- the host's top-level symlinks (bin -> usr/bin, ...), empty /tmp, /run,
  /var/tmp, /home, /root;
- a fresh /proc, a read-only /sys of the pod's network namespace, and a
  small /dev (null, zero, full, random, urandom, tty, shm, fd links);
- then the bind mounts (volumes, /usr/local/bin, /etc/hosts, the
  termination log), each read-only when asked.
With readonly_root, every mount of the image itself (the tmpfs root and
the overlays) is then made read-only, as runc does for
readOnlyRootFilesystem; volumes keep their own mode.

Standard library only; everything it needs is imported before chroot."""

import ctypes
import ctypes.util
import json
import os
import signal
import sys

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
CAP_VERSION_3 = 0x20080522

libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


class LaunchError(Exception):
    pass


def _check(rc, what):
    if rc != 0:
        e = ctypes.get_errno()
        raise LaunchError(f"{what}: {os.strerror(e)}")


def mount(src, dst, fstype, flags, data=None):
    _check(libc.mount(src.encode() if src else None, dst.encode(), fstype.encode() if fstype else None,
                      ctypes.c_ulong(flags), data.encode() if data else None),
           f"mount {fstype or 'bind'} {src or ''} on {dst}")


def remount_ro(path):
    _check(libc.mount(None, path.encode(), None, ctypes.c_ulong(MS_REMOUNT | MS_BIND | MS_RDONLY), None),
           f"making {path} read-only")


def secure_join(root, path):
    """root + path with every symlink on the way resolved inside root (an
    absolute link restarts at root), so a mount point can never land
    outside the container's root file system."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done = []
    hops = 0
    while parts:
        p = parts.pop(0)
        if p == "..":
            if done:
                done.pop()
            continue
        cur = os.path.join(root, *done, p)
        if os.path.islink(cur):
            hops += 1
            if hops > 40:
                raise LaunchError(f"too many levels of symbolic links in {path}")
            target = os.readlink(cur)
            if target.startswith("/"):
                done = []
            parts = [x for x in target.split("/") if x not in ("", ".")] + parts
            continue
        done.append(p)
    return os.path.join(root, *done) if done else root


def make_mountpoint(root, path, is_dir):
    target = secure_join(root, path)
    os.makedirs(target if is_dir else os.path.dirname(target), exist_ok=True)
    if not is_dir and not os.path.exists(target):
        with open(target, "w"):
            pass
    return target


def build_root(spec):
    root, scratch = spec["root"], spec["scratch"]
    # private mounts only: unshare --propagation private made them so
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    mount("tmpfs", scratch, "tmpfs", 0, "mode=0700")
    for d in spec["image_dirs"]:
        upper, work, tgt = os.path.join(scratch, "upper", d), os.path.join(scratch, "work", d), os.path.join(root, d)
        for p in (upper, work, tgt):
            os.makedirs(p, exist_ok=True)
        mount("overlay", tgt, "overlay", 0, f"lowerdir=/{d},upperdir={upper},workdir={work}")
    for name, target in spec["image_links"].items():
        os.symlink(target, os.path.join(root, name))
    for rel, mode in spec["empty_dirs"]:
        p = secure_join(root, rel)
        os.makedirs(p, exist_ok=True)
        os.chmod(p, mode)
    proc = os.path.join(root, "proc")
    os.makedirs(proc, exist_ok=True)
    mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    sysd = os.path.join(root, "sys")
    os.makedirs(sysd, exist_ok=True)
    mount("sysfs", sysd, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    dev = os.path.join(root, "dev")
    os.makedirs(dev, exist_ok=True)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=0755")
    for node in ("null", "zero", "full", "random", "urandom", "tty"):
        if os.path.exists(f"/dev/{node}"):
            p = os.path.join(dev, node)
            with open(p, "w"):
                pass
            mount(f"/dev/{node}", p, None, MS_BIND)
    shm = os.path.join(dev, "shm")
    os.makedirs(shm)
    mount("shm", shm, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))
    for b in spec["binds"]:
        src = b["src"]
        if not os.path.exists(src):
            raise LaunchError(f"bind mount source {src} (for {b['dst']}) does not exist")
        tgt = make_mountpoint(root, b["dst"], os.path.isdir(src))
        mount(src, tgt, None, MS_BIND | MS_REC)
        if b.get("ro"):
            remount_ro(tgt)
    make_mountpoint(root, spec["cwd"], True)  # runc makes a missing workingDir
    if spec["readonly_root"]:
        for d in spec["image_dirs"]:
            remount_ro(os.path.join(root, d))
        remount_ro(root)


def find_executable(root, argv0, path):
    """argv0 resolved the way runc does: as given when it has a slash,
    else the first executable match in the container's PATH."""
    if "/" in argv0:
        return argv0
    for d in (path or "").split(":"):
        cand = os.path.join(d or ".", argv0)
        full = secure_join(root, cand) if cand.startswith("/") else None
        if full and os.path.isfile(full) and os.access(full, os.X_OK):
            return cand
    raise LaunchError(f"exec: \"{argv0}\": executable file not found in $PATH")


def drop_caps(keep):
    last = 40
    try:
        last = int(open("/proc/sys/kernel/cap_last_cap").read())
    except OSError:
        pass
    for cap in range(last + 1):
        if cap not in keep:
            _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap}")
    return last


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def set_caps(keep):
    bits = 0
    for c in keep:
        bits |= 1 << c
    hdr = _CapHeader(CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in (0, 1):
        word = (bits >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = word
        data[i].inheritable = 0
    _check(libc.capset(ctypes.byref(hdr), data), "setting capabilities")


def launch(spec, status_fd):
    build_root(spec)
    if spec.get("hostname"):
        name = spec["hostname"].encode()
        _check(libc.sethostname(name, len(name)), "sethostname")
    root = spec["root"]
    exe = find_executable(root, spec["argv"][0], spec.get("path"))
    env = {k: v for k, v in spec["env"]}
    uid, gid, groups = spec.get("uid"), spec.get("gid"), spec.get("groups") or []
    os.chroot(root)
    os.chdir(spec["cwd"] or "/")
    if gid is None:
        gid = 0
        if uid is not None:
            try:
                for line in open("/etc/passwd"):
                    f = line.rstrip("\n").split(":")
                    if len(f) > 3 and f[2] == str(uid):
                        gid = int(f[3])
                        break
            except (OSError, ValueError):
                pass
    keep = spec.get("caps")
    if keep is not None:
        drop_caps(set(keep))
    os.setgroups(sorted(set([gid] + groups)))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid or 0, uid or 0, uid or 0)
    if keep is not None and (uid or 0) == 0:
        set_caps(keep)
    if spec.get("no_new_privs"):
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    # die with the kubelet (the parent is the kubelet thread that started us)
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    if os.getppid() != spec["parent_pid"]:
        raise LaunchError("the kubelet went away")
    os.set_inheritable(status_fd, False)
    os.execve(exe, spec["argv"], env)


def main():
    spec_path, status_fd = sys.argv[1], int(sys.argv[2])
    try:
        with open(spec_path) as f:
            spec = json.load(f)
        launch(spec, status_fd)
    except (LaunchError, OSError) as e:
        msg = str(e) if isinstance(e, LaunchError) else f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        try:
            os.write(status_fd, msg.encode()[:4000])
        except OSError:
            pass
        print(f"kubelet stand-in: cannot start the container: {msg}", file=sys.stderr, flush=True)
        os._exit(128)


if __name__ == "__main__":
    main()
