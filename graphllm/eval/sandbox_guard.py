"""Run one untrusted program under limits: `python -I sandbox_guard.py PROGRAM ROOT CPU_S MEM_BYTES FSIZE_BYTES`.

This file is executed as a script in the child process (never imported by graphllm), normally inside
bubblewrap (graphllm/eval/sandbox.py), which is the boundary: namespaces, no capabilities, a read-only
view of the host with only ROOT writable. This guard is a second layer inside it. Before the program's
first line it
- sets resource limits: CPU seconds, address space, size of any file written (stdout/stderr files
  included), no core dumps (inside the sandbox the program cannot raise them again: no capabilities);
- installs an audit hook (PEP 578) that refuses sockets, process creation (fork/exec/spawn/system/
  Popen), signals to other processes, ctypes, and raising the limits again; refuses opening a file
  outside ROOT (the program's fresh temp directory) except read-only opens of Python code
  (`.py`/`.pyc`/`.so`/...) under the interpreter's import path, which `import` needs; and confines
  listing, creating, renaming, removing and chmod-ing paths to ROOT.

The hook is not a security boundary: the program runs in this same interpreter and can switch it off
(rebind DENIED_EVENTS through `sys.modules["__main__"]`, rewrite the hook's closure found with `gc`),
and it misses what it has no rule for (`sqlite3.connect` creates files anywhere; `pidfd_send_signal`
has no audit event). It turns the usual mistakes of generated code into a clear `sandbox: ...` error;
only under --allow-unsandboxed-exec is it all there is.
"""

import os
import resource
import sys

CODE_SUFFIXES = (".py", ".pyc", ".so", ".pyd", ".pth", ".typed")
DENIED_EVENTS = frozenset({
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg",
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
    "pty.spawn", "os.kill", "os.killpg", "os.startfile",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.call_function",
    "resource.setrlimit", "resource.prlimit", "sys._current_frames", "os.chroot",
})
DENIED_MODULES = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "socket", "_socket", "ssl", "_ssl",
                            "multiprocessing", "_multiprocessing", "asyncio", "select", "selectors"})
# audit events whose first argument is a path that must lie in ROOT
ROOT_PATH_EVENTS = frozenset({"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                              "os.utime", "os.chdir", "os.chflags", "os.setxattr", "os.removexattr",
                              "shutil.rmtree", "shutil.chown", "os.mknod", "os.mkfifo"})
TWO_PATH_EVENTS = frozenset({"os.rename", "os.link", "os.symlink", "shutil.copyfile", "shutil.copymode",
                             "shutil.copystat", "shutil.move"})
LIST_EVENTS = frozenset({"os.listdir", "os.scandir", "glob.glob", "os.walk", "pathlib.Path.glob"})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def install(root: str) -> None:
    root = os.path.realpath(root)
    import_dirs = tuple(os.path.realpath(p) for p in sys.path if p and os.path.isdir(p))

    def resolve(path) -> str | None:
        if isinstance(path, int):
            return None
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return os.path.realpath(os.path.join(root, os.fspath(path)))

    def inside(path: str, base: str) -> bool:
        return path == base or path.startswith(base.rstrip(os.sep) + os.sep)

    def deny(event: str, detail: object = "") -> None:
        raise PermissionError(f"sandbox: {event} {detail!r} is not allowed".replace(" ''", ""))

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path = resolve(args[0])
            if path is None or inside(path, root):
                return
            mode, flags = args[1] or "", args[2] or 0
            read_only = not (set(str(mode)) & set("wax+")) and not flags & WRITE_FLAGS
            if read_only and path.endswith(CODE_SUFFIXES) and any(inside(path, d) for d in import_dirs):
                return
            deny("opening", path)
        elif event in DENIED_EVENTS:
            deny(event)
        elif event == "import" and str(args[0]).split(".")[0] in DENIED_MODULES:
            deny("import", args[0])
        elif event in ROOT_PATH_EVENTS or event in LIST_EVENTS or event in TWO_PATH_EVENTS:
            paths = args[:2] if event in TWO_PATH_EVENTS else args[:1]
            for p in paths:
                if isinstance(p, int) or p is None:
                    continue
                path = resolve(p)
                ok = inside(path, root) or (event in LIST_EVENTS and any(inside(path, d) for d in import_dirs))
                if not ok:
                    deny(event, path)

    for name in list(sys.modules):
        if name.split(".")[0] in DENIED_MODULES:
            del sys.modules[name]  # so that importing it again raises the `import` event
    sys.addaudithook(hook)


def main() -> None:
    program, root, cpu_s, mem_bytes, fsize_bytes = sys.argv[1:6]
    resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_s), int(cpu_s)))
    if int(mem_bytes):
        resource.setrlimit(resource.RLIMIT_AS, (int(mem_bytes), int(mem_bytes)))
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(fsize_bytes), int(fsize_bytes)))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with open(program, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, program, "exec")
    sys.argv = [program]
    install(root)
    exec(code, {"__name__": "__main__", "__file__": program, "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
