"""The sandbox core, adversarially: one test per guarantee of `rstar.sandbox.pool`.

Every test runs hostile code through one shared warm pool and then checks that
the pool is still healthy and a normal program still runs. Guarantees that a
layer provides are skipped (with the reason) where that layer does not work
on the machine, so the suite states what the machine can enforce.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from rstar.sandbox.config import SandboxConfig
from rstar.sandbox.pool import QueueFull, Sandbox
from rstar.sandbox.isolation import DENIED_SYSCALLS, read_only_paths

pytestmark = pytest.mark.timeout(60)

SECRET = "rstar-test-secret-7f3a9"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sandbox():
    os.environ["RSTAR_SANDBOX_TEST_SECRET"] = SECRET  # the service's environment holds a "secret"
    sb = Sandbox(SandboxConfig(pool_size=2, max_concurrent=2, max_queue=8, wall_seconds=2.0,
                               output_bytes=64 * 1024, file_bytes=1024 * 1024, require_layers=["rlimits"]))
    sb.start(timeout=60)
    yield sb
    sb.close()
    os.environ.pop("RSTAR_SANDBOX_TEST_SECRET", None)


def run(sb: Sandbox, code: str, **limits):
    (result,) = sb.execute([code], sb.resolve_limits(**limits))
    return result


def need(sb: Sandbox, layer: str) -> None:
    if layer not in sb.state.layers:
        pytest.skip(f"isolation layer {layer} inactive here: {sb.state.errors.get(layer, 'disabled')}")


def assert_healthy(sb: Sandbox) -> None:
    """After any attack: the pool is ready and a normal program runs and prints."""
    assert sb.state.ready
    r = run(sb, "import sympy\nx = sympy.Symbol('x')\nprint(sympy.solve(x**2 - 4, x))")
    assert r.failure == "ok", r
    assert r.stdout == "[-2, 2]\n"


# ---------------------------------------------------------------- normal behaviour
def test_runs_a_program_and_captures_stdout_stderr(sandbox):
    r = run(sandbox, "import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert (r.failure, r.exit_code, r.stdout, r.stderr, r.truncated) == ("ok", 0, "out\n", "err\n", False)
    assert 0 < r.duration_seconds < 2


def test_exception_is_error_with_traceback(sandbox):
    r = run(sandbox, "x = 1\nprint('before')\n1/0")
    assert r.failure == "error" and r.exit_code == 1 and r.stdout == "before\n"
    assert 'File "<program>", line 3' in r.stderr and "ZeroDivisionError" in r.stderr
    assert "rstar/sandbox" not in r.stderr and "child.py" not in r.stderr  # the worker's own frames are hidden
    assert run(sandbox, "def f(:\n").failure == "error"


def test_batch_runs_concurrently_results_in_order(sandbox):
    programs = [f"import time\ntime.sleep(0.4)\nprint({i})" for i in range(6)]
    start = time.monotonic()
    results = sandbox.execute(programs)
    elapsed = time.monotonic() - start
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]
    assert elapsed < 6 * 0.4  # two at a time, not one
    assert elapsed >= 3 * 0.4 - 0.05  # max_concurrent=2 is honoured


def test_preloaded_libraries_are_usable(sandbox):
    r = run(sandbox, "import numpy as np, fractions, math\nprint(np.arange(4).sum(), fractions.Fraction(1, 3) * 3,"
                     " math.comb(5, 2))")
    assert r.stdout == "6 1 10\n", r
    assert {"numpy", "sympy", "fractions"} <= set(sandbox.state.info["preloaded"])


def test_invalid_input_is_rejected(sandbox):
    with pytest.raises(ValueError):
        sandbox.execute([])
    with pytest.raises(ValueError):
        sandbox.execute(["print(1)"] * (sandbox.config.max_programs + 1))
    with pytest.raises(ValueError):
        sandbox.execute(["x = 1\n" * 100_000])
    with pytest.raises(ValueError):
        sandbox.resolve_limits(wall_seconds=-1)
    with pytest.raises(ValueError):
        sandbox.resolve_limits(memory_bytes=1 << 50)


def test_queue_full_is_rejected_and_nothing_leaks(sandbox):
    slow = ["import time\ntime.sleep(0.5)"] * 10  # max_concurrent 2 + max_queue 8
    t = threading.Thread(target=sandbox.execute, args=(slow,))
    t.start()
    time.sleep(0.1)
    with pytest.raises(QueueFull):
        sandbox.execute(["print(1)"])
    t.join()
    assert_healthy(sandbox)


def test_deadline_cancels_the_batch(sandbox):
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        sandbox.execute(["import time\ntime.sleep(30)"] * 3, timeout=0.5)
    assert time.monotonic() - start < 2
    assert_healthy(sandbox)


# ---------------------------------------------------------------- limits
def test_infinite_loop_times_out(sandbox):
    r = run(sandbox, "print('start', flush=True)\nwhile True:\n    pass", wall_seconds=0.5)
    assert r.failure == "timeout" and r.exit_code == -signal.SIGKILL
    assert r.stdout == "start\n"  # partial output survives
    assert 0.5 <= r.duration_seconds < 1.5
    assert_healthy(sandbox)


def test_sleeping_program_times_out_on_wall_time(sandbox):
    r = run(sandbox, "import time\ntime.sleep(10)", wall_seconds=0.3)
    assert r.failure == "timeout" and r.duration_seconds < 1.5


def test_memory_bomb_hits_memory_limit(sandbox):
    r = run(sandbox, "x = []\nwhile True:\n    x.append(bytearray(10**6))", memory_bytes=64 * 1024 * 1024)
    assert r.failure == "memory", r
    assert "MemoryError" in r.stderr
    r = run(sandbox, "import numpy as np\na = np.ones(10**9)", memory_bytes=64 * 1024 * 1024)
    assert r.failure == "memory", r
    assert_healthy(sandbox)


def test_memory_within_limit_is_fine(sandbox):
    r = run(sandbox, "x = bytearray(40 * 10**6)\nprint(len(x))", memory_bytes=128 * 1024 * 1024)
    assert r.failure == "ok" and r.stdout == "40000000\n"


def test_huge_output_is_capped_and_killed(sandbox):
    start = time.monotonic()
    r = run(sandbox, "print('x' * 100_000_000)", output_bytes=4096)
    assert r.failure == "output_limit" and r.truncated
    assert len(r.stdout) == 4096 and set(r.stdout) == {"x"}
    assert time.monotonic() - start < 3
    r = run(sandbox, "import sys\nwhile True:\n    sys.stderr.write('e' * 1000 + '\\n')", output_bytes=10_000)
    program_stderr, note = r.stderr.split("\n[sandbox]")
    assert r.failure == "output_limit" and len(program_stderr) + len(r.stdout) == 10_000
    assert "output exceeded" in note
    assert_healthy(sandbox)


def test_huge_file_is_capped_by_file_size_limit(sandbox):
    r = run(sandbox, "import os\nf = open('big', 'wb')\nf.write(b'x' * 50_000_000)\nf.close()")
    assert r.failure == "error" and "File too large" in r.stderr, r
    r = run(sandbox, "f = open('ok', 'wb')\nf.write(b'x' * 500_000)\nf.close()\nprint('done')")
    assert r.failure == "ok"
    assert_healthy(sandbox)


# ---------------------------------------------------------------- exits and crashes
@pytest.mark.parametrize("code, failure, exit_code", [
    ("import sys\nsys.exit(0)", "ok", 0),
    ("import sys\nprint('bye')\nsys.exit(3)", "error", 3),
    ("import sys\nsys.exit('message')", "error", 1),
    ("import os\nos._exit(7)", "error", 7),
    ("import ctypes\nctypes.string_at(0)", "killed", -signal.SIGSEGV),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "killed", -signal.SIGKILL),
])
def test_exits_and_crashes_are_classified(sandbox, code, failure, exit_code):
    r = run(sandbox, code)
    assert (r.failure, r.exit_code) == (failure, exit_code), r
    assert_healthy(sandbox)


def test_closing_stdout_and_stderr(sandbox):
    r = run(sandbox, "import os\nprint('first', flush=True)\nos.close(1)\nos.close(2)\nprint('lost')")
    assert r.failure == "error" and r.stdout == "first\n"
    assert_healthy(sandbox)


# ---------------------------------------------------------------- processes
def test_fork_bomb_cannot_fork(sandbox):
    need(sandbox, "seccomp")
    r = run(sandbox, "import os\nn = 0\nfor _ in range(100):\n    try:\n        pid = os.fork()\n"
                     "    except OSError:\n        continue\n    if pid == 0:\n        print('child', flush=True)\n"
                     "        os._exit(0)\n    n += 1\nprint('forked', n)", wall_seconds=2)
    assert r.stdout == "forked 0\n", r
    assert_healthy(sandbox)


@pytest.mark.parametrize("code", [
    "import os\nrc = os.system('echo pwned')\nprint('rc', rc)",
    "import subprocess\nprint(subprocess.run(['/bin/echo', 'pwned'], capture_output=True).stdout)",
    "import os\nos.execv('/bin/echo', ['echo', 'pwned'])",
    "import multiprocessing as mp\np = mp.Process(target=print, args=('pwned',))\np.start()\np.join()",
])
def test_no_subprocesses(sandbox, code):
    need(sandbox, "seccomp")
    r = run(sandbox, code)
    assert "pwned" not in r.stdout, r
    assert r.failure in ("ok", "error")
    assert_healthy(sandbox)


def test_threads_still_work(sandbox):
    r = run(sandbox, "import threading\nout = []\nt = threading.Thread(target=out.append, args=(1,))\n"
                     "t.start()\nt.join()\nprint(out)")
    assert r.failure in ("ok", "error")  # threads are processes for RLIMIT_NPROC: allowed only when not root


def test_cannot_kill_the_parent_or_the_service(sandbox):
    need(sandbox, "seccomp")
    hit = threading.Event()
    old = signal.signal(signal.SIGUSR1, lambda *_: hit.set())
    try:
        r = run(sandbox, f"import os, signal\nfor pid in (os.getppid(), {os.getpid()}):\n    try:\n"
                         "        os.kill(pid, signal.SIGUSR1)\n        print('sent', pid)\n"
                         "    except OSError as e:\n        print('denied', e.errno)\n"
                         "os.kill(os.getppid(), signal.SIGKILL)")
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert not hit.is_set()
    assert r.stdout == "denied 1\ndenied 1\n" and r.failure == "error", r
    assert sandbox.state.restarts == 0
    assert_healthy(sandbox)


# ---------------------------------------------------------------- network
@pytest.fixture()
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.3)
    yield srv
    srv.close()


def test_no_connection_to_a_local_listener(sandbox, listener):
    need(sandbox, "seccomp")
    port = listener.getsockname()[1]
    r = run(sandbox, f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                     "s.sendall(b'leak')\nprint('connected')")
    assert r.failure == "error" and "connected" not in r.stdout, r
    with pytest.raises(socket.timeout):
        listener.accept()
    assert_healthy(sandbox)


def test_no_connection_outside(sandbox):
    need(sandbox, "seccomp")
    for code in ("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)",
                 "import urllib.request\nurllib.request.urlopen('http://1.1.1.1', timeout=1)",
                 "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', ('8.8.8.8', 53))",
                 "import socket\nsocket.socket(socket.AF_UNIX).connect('/run/anything')"):
        r = run(sandbox, code)
        assert r.failure == "error" and ("PermissionError" in r.stderr or "Operation not permitted" in r.stderr), r


def test_network_namespace_is_private_and_empty(sandbox):
    need(sandbox, "namespaces")
    zygote = sandbox.state.info["pid"]
    assert os.readlink(f"/proc/{zygote}/ns/net") != os.readlink("/proc/self/ns/net")
    interfaces = [line.split(":")[0].strip() for line in Path(f"/proc/{zygote}/net/dev").read_text().splitlines()[2:]]
    assert interfaces == ["lo"]
    for worker in Path(f"/proc/{zygote}/task/{zygote}/children").read_text().split():
        try:
            assert os.readlink(f"/proc/{worker}/ns/net") == os.readlink(f"/proc/{zygote}/ns/net")
        except FileNotFoundError:  # a run's PID-namespace holder exits just after its run
            pass


# ---------------------------------------------------------------- filesystem and environment
@pytest.mark.parametrize("path", ["/etc/passwd", "/etc/hostname", "/proc/1/environ", "/proc/self/environ",
                                  str(REPO / "rstar" / "sandbox" / "pool.py"), str(REPO / "pyproject.toml")])
def test_cannot_read_host_files(sandbox, path):
    need(sandbox, "landlock")
    r = run(sandbox, f"print(open({path!r}, 'rb').read()[:80])")
    # with pidns too, /proc is an empty tmpfs: the path is not even found
    denied = "PermissionError" in r.stderr or (path.startswith("/proc/") and "FileNotFoundError" in r.stderr)
    assert r.failure == "error" and denied, r
    assert r.stdout == ""


def test_cannot_list_other_directories(sandbox):
    need(sandbox, "landlock")
    for d in ("/", "/etc", "/proc", str(REPO), "/tmp"):
        r = run(sandbox, f"import os\nprint(os.listdir({d!r}))")
        assert r.failure == "error", (d, r)


def test_environment_holds_no_secrets(sandbox):
    assert os.environ["RSTAR_SANDBOX_TEST_SECRET"] == SECRET
    r = run(sandbox, "import os\nprint(dict(os.environ))\n"
                     "for p in ('/proc/self/environ', f'/proc/{os.getppid()}/environ'):\n"
                     "    try:\n        print(open(p, 'rb').read())\n    except OSError as e:\n        print(e)")
    assert SECRET not in r.stdout and "RSTAR" not in r.stdout, r
    assert "PATH" not in r.stdout


def test_cannot_write_outside_scratch(sandbox, tmp_path):
    need(sandbox, "landlock")
    targets = [tmp_path / "evil.txt", Path("/tmp") / f"rstar-evil-{os.getpid()}", REPO / "evil.py"]
    for target in targets:
        r = run(sandbox, f"open({str(target)!r}, 'w').write('x')")
        assert r.failure == "error" and "PermissionError" in r.stderr, r
        assert not target.exists()
    r = run(sandbox, "import os\nos.mkdir('../escape')")
    assert r.failure == "error"


def test_scratch_directory_is_private_fresh_and_removed(sandbox):
    r1 = run(sandbox, "import os\nopen('note.txt', 'w').write('run 1')\nprint(os.getcwd())\nprint(os.listdir('.'))")
    cwd = r1.stdout.splitlines()[0]
    assert r1.stdout.splitlines()[1] == "['note.txt']"
    r2 = run(sandbox, "import os\nprint(os.getcwd())\nprint(os.listdir('.'))")
    assert r2.stdout.splitlines()[0] != cwd and r2.stdout.splitlines()[1] == "[]"
    assert not Path(cwd).exists()  # deleted after the run


def test_no_state_leaks_between_runs(sandbox):
    r1 = run(sandbox, "import math, builtins, sympy, sys\nmath.pi = 3\nbuiltins.LEAK = 1\n"
                      "sympy.Symbol = None\nsys.modules['leak'] = math\nglobal_value = 42\n"
                      "import numpy\nnumpy.random.seed(0)\nprint('set')")
    assert r1.stdout == "set\n"
    r2 = run(sandbox, "import math, builtins, sympy, sys\nprint(math.pi, hasattr(builtins, 'LEAK'),"
                      " sympy.Symbol is None, 'leak' in sys.modules, 'global_value' in globals())")
    assert r2.stdout == "3.141592653589793 False False False False\n", r2


# ---------------------------------------------------------------- the pool itself
def test_pool_refills_after_an_idle_worker_is_killed(sandbox):
    zygote = sandbox.state.info["pid"]
    children = Path(f"/proc/{zygote}/task/{zygote}/children").read_text().split()
    assert len(children) >= 1
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while sandbox.state.idle < sandbox.config.pool_size and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox.state.idle == sandbox.config.pool_size
    assert_healthy(sandbox)


def test_isolation_layers_are_reported(sandbox):
    from rstar import metrics

    assert "rlimits" in sandbox.state.layers
    for layer in ("rlimits", "namespaces", "unprivileged", "landlock", "seccomp"):
        value = metrics.SANDBOX_ISOLATION.labels(layer)._value.get()
        assert value == (1 if layer in sandbox.state.layers else 0)
        assert layer in sandbox.state.layers or layer in sandbox.state.errors
    assert sandbox.info()["isolation_layers"] == ",".join(sandbox.state.layers)


def test_readable_paths_exclude_the_service():
    for p in read_only_paths():
        assert not (str(REPO) + os.sep).startswith(p.rstrip(os.sep) + os.sep), p  # no ancestor of the repo
        assert not p.startswith(str(REPO) + os.sep) or p.startswith(str(REPO / ".venv")), p
    assert "socket" in DENIED_SYSCALLS and "execve" in DENIED_SYSCALLS


def test_no_sysv_ipc_objects_that_outlive_a_run(sandbox):
    need(sandbox, "seccomp")
    code = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.shmget(4242, 4096, 0o1666))"
    assert run(sandbox, code).stdout == "-1\n"


def test_cannot_raise_its_own_limits(sandbox):
    r = run(sandbox, "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\nprint('raised')")
    assert r.failure == "error" and "raised" not in r.stdout, r
    r = run(sandbox, "import resource\nsoft, hard = resource.getrlimit(resource.RLIMIT_CPU)\nprint(soft, hard)",
            wall_seconds=2)
    assert r.stdout == "3 4\n"  # ceil(wall) + 1, hard one above
