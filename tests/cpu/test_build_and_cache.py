"""The C++ CPU kernels' build, cache and load (`jaxbn._cpu.library`, `build`, `cache`), and
their faults, also where `batch_norm` asks for them.

A truncated, empty or foreign library in the cache, a cache other users can write, a relative
or empty cache directory, a library swapped after its check, a compiler that fails in Latin-1,
hangs, or is missing, another process holding the build, spellings of JAXBN_CPU_KERNEL, an
empty feature axis, a host whose default backend is not CPU: each ends in the kernels or the
pure-JAX path, with at most one warning, never a crash or a long hang; what loads is always the
file that was verified.

`library.status()` decides once per process, so most tests call `_load()` directly with
a fake $CXX: a shell script that answers `--version`, then does one thing wrong (or copies a
real library, built once per session, to its `-o` path: a fast "compiler").
"""

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import kernels
from jaxbn._cpu import build as kernel_build
from jaxbn._cpu import cache as kernel_cache
from jaxbn._cpu import calls as kernel_calls
from jaxbn._cpu import library as kernel_library

C_COMPILER = shutil.which("cc") or shutil.which("gcc")


@pytest.fixture(scope="session")
def good_library(tmp_path_factory) -> Path:
  """A copy of this machine's real kernel library (built on first use)."""
  status = kernels.status()
  if not status.available:
    pytest.skip(f"the kernels cannot be built here: {status.reason}")
  copy = tmp_path_factory.mktemp("good") / "batch_norm_cpu.so"
  shutil.copy(status.library, copy)
  return copy


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
  """An empty cache directory of this test's own, and no jaxbn settings from outside."""
  directory = tmp_path / "cache"
  directory.mkdir()
  directory.chmod(0o755)  # whatever the umask: a group-writable cache would be refused
  monkeypatch.setenv("JAXBN_CACHE_DIR", str(directory))
  for name in ("JAXBN_CPU_KERNEL", "JAXBN_COMPILE_TIMEOUT", "JAXBN_CXXFLAGS_EXTRA"):
    monkeypatch.delenv(name, raising=False)
  return directory


@pytest.fixture
def fake_cxx(tmp_path, monkeypatch):
  """Makes $CXX a script that answers --version, sets $out to its -o argument, runs `body`."""

  def make(body: str) -> Path:
    script = tmp_path / "fake-c++"
    script.write_text("#!/bin/sh\n"
                      '[ "$1" = --version ] && { echo fake-c++ 1.0; exit 0; }\n'
                      'while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done\n'
                      f"{body}\n")
    script.chmod(0o755)
    monkeypatch.setenv("CXX", str(script))
    return script

  return make


@pytest.fixture
def registered(monkeypatch) -> list[str]:
  """Records FFI registrations instead of replacing the real kernels of this process."""
  names = []
  monkeypatch.setattr(jax.ffi, "register_ffi_target", lambda name, *a, **k: names.append(name))
  return names


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records
          if r.name == "jaxbn" and r.levelno >= logging.WARNING]


def _library_path(script: Path) -> Path:
  return kernel_build._cache_path([str(script)], 60.0)[1]


def _alive(pid: int) -> bool:
  try:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except FileNotFoundError:
    return False
  return state not in ("Z", "X")  # a zombie is dead, only not yet reaped


def _plant(tmp_path: Path, output: Path, marker: Path):
  """Compiles to `output` a library whose constructor creates `marker` when it is loaded."""
  source = tmp_path / "planted.c"
  source.write_text("#include <stdio.h>\n__attribute__((constructor)) static void planted(void)"
                    f' {{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
  subprocess.run([C_COMPILER, "-shared", "-fPIC", str(source), "-o", str(output)], check=True)


# ----------------------------------------------------------------------------------------
# What is in the cache.


_TRUNCATED = """
import jax.numpy as jnp
from jaxbn import kernels
status = kernels.status()
print(status.available, status.reason)
print(kernels.moments(kernels.FeatureView(3, 1), jnp.arange(12.0).reshape(4, 3))[0])
"""


@pytest.mark.slow
def test_a_truncated_library_is_rebuilt_not_loaded(cache, fake_cxx, good_library):
  script = fake_cxx(f'cp "{good_library}" "$out"')
  library = _library_path(script)
  data = good_library.read_bytes()
  library.write_bytes(data[:len(data) // 2])  # what a full disk or a killed copy leaves
  library.chmod(0o755)
  kernel_cache.write_atomically(kernel_cache.digest_path(library),
                                  kernel_cache.digest(library, data))
  # In a subprocess: dlopen of a truncated library dies of SIGBUS, which would end pytest.
  result = subprocess.run([sys.executable, "-c", _TRUNCATED], capture_output=True, text=True,
                          timeout=300, check=False, env=os.environ)
  assert result.returncode == 0, result.stderr
  assert "True compiled and registered" in result.stdout
  assert "[4.5 5.5 6.5]" in result.stdout
  assert library.read_bytes() == data
  warnings = [line for line in result.stderr.splitlines() if line.startswith("jaxbn:")]
  assert len(warnings) == 1 and "truncated" in warnings[0], result.stderr


def test_an_empty_library_is_refused_and_not_cached(cache, fake_cxx, caplog):
  fake_cxx(":")  # exits 0 and writes nothing
  for _ in range(2):  # not cached: the next process tries again (and fails again)
    status = kernel_library._load()
    assert not status.available
    assert "exited with 0 but wrote nothing" in status.reason
  assert sorted(p.name for p in cache.iterdir()) == [".build.lock"]
  unavailable = [w for w in _warnings(caplog) if "unavailable" in w]
  assert len(unavailable) == 2 and "JAXBN_CPU_KERNEL=0" in unavailable[0]


@pytest.mark.slow
@pytest.mark.skipif(C_COMPILER is None, reason="no C compiler to build a foreign library")
def test_a_foreign_library_at_the_cache_path_is_replaced_without_running_it(
    tmp_path, cache, fake_cxx, good_library, registered, caplog):
  marker = tmp_path / "constructor-ran"
  library = _library_path(fake_cxx(f'cp "{good_library}" "$out"'))
  _plant(tmp_path, library, marker)
  status = kernel_library._load()
  assert status.available, status.reason
  assert not marker.exists(), "the foreign library was loaded"
  assert library.read_bytes() == good_library.read_bytes()
  assert sorted(registered) == sorted(kernel_library.TARGETS)
  assert _warnings(caplog) == [
      f"jaxbn: compiling the CPU kernels once per machine (about 10 s) into {library}; the "
      "cached copy has no digest, so it is not a complete jaxbn build"]
  caplog.clear()
  assert kernel_library._load().available and not _warnings(caplog)  # verified: no rebuild


def test_a_cache_directory_other_users_can_write_is_not_used(tmp_path, cache, fake_cxx,
                                                             caplog):
  marker = tmp_path / "compiled"
  fake_cxx(f'touch "{marker}"; exit 1')
  cache.chmod(0o777)
  status = kernel_library._load()
  assert not status.available
  assert "is writable by other users" in status.reason
  assert not marker.exists(), "it compiled into a directory others can write"
  [warning] = _warnings(caplog)
  assert "JAXBN_CACHE_DIR" in warning and f"chmod go-w {cache}" in warning


@pytest.mark.parametrize("tamper", ["writable by others", "owned by another user"])
def test_a_library_another_user_could_have_written_is_rebuilt(cache, fake_cxx, good_library,
                                                               registered, caplog, tamper):
  library = _library_path(fake_cxx(f'cp "{good_library}" "$out"'))
  assert kernel_library._load().available  # a verified build
  if tamper == "writable by others":
    library.chmod(0o777)
  else:
    if os.geteuid() != 0:
      pytest.skip("only root can give a file to another user")
    os.chown(library, 65534, 65534)
  caplog.clear()
  assert kernel_library._load().available
  info = library.stat()
  assert info.st_uid == os.geteuid() and info.st_mode & 0o022 == 0
  [warning] = _warnings(caplog)
  assert "compiling" in warning and "is not trusted" in warning


# ----------------------------------------------------------------------------------------
# Where the cache is, and which file is loaded from it.


_IN_CWD = """
import jax.numpy as jnp
from jaxbn import kernels
status = kernels.status()
print(status.available, status.reason, status.library)
print(kernels.moments(kernels.FeatureView(3, 1), jnp.arange(12.0).reshape(4, 3))[0])
"""


@pytest.mark.slow
@pytest.mark.skipif(C_COMPILER is None, reason="no C compiler to build a planted library")
def test_a_relative_cache_dir_loads_from_the_cwd_never_from_the_library_path(
    tmp_path, cache, fake_cxx, good_library):
  name = _library_path(fake_cxx(f'cp "{good_library}" "$out"')).name
  marker, planted = tmp_path / "constructor-ran", tmp_path / "on-the-library-path"
  planted.mkdir()
  _plant(tmp_path, planted / name, marker)  # the bare name, where the loader searches
  work = tmp_path / "work"
  work.mkdir()
  work.chmod(0o755)
  result = subprocess.run(
      [sys.executable, "-c", _IN_CWD], capture_output=True, text=True, timeout=300,
      check=False, cwd=work,
      env={**os.environ, "JAXBN_CACHE_DIR": ".", "LD_LIBRARY_PATH": str(planted)})
  assert result.returncode == 0, result.stderr
  assert not marker.exists(), "a library found on LD_LIBRARY_PATH was loaded"
  assert f"True compiled and registered {work / name}\n" in result.stdout, result.stderr
  assert "[4.5 5.5 6.5]" in result.stdout
  assert (work / name).read_bytes() == good_library.read_bytes()


def test_an_empty_cache_dir_is_the_default_and_a_relative_one_is_under_the_cwd(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  monkeypatch.setenv("JAXBN_CACHE_DIR", "")
  assert kernel_build.cache_dir() == tmp_path / "xdg" / "jaxbn"
  monkeypatch.setenv("JAXBN_CACHE_DIR", "kernels/cache")
  assert kernel_build.cache_dir() == tmp_path / "kernels" / "cache"
  monkeypatch.setenv("JAXBN_CACHE_DIR", ".")
  assert kernel_build.cache_dir() == tmp_path
  # The XDG rule: a relative XDG_CACHE_HOME is invalid and ignored.
  monkeypatch.delenv("JAXBN_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", "xdg")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert kernel_build.cache_dir() == tmp_path / "home" / ".cache" / "jaxbn"


def test_directories_it_creates_are_not_writable_by_others_under_any_umask(
    tmp_path, cache, fake_cxx, monkeypatch):
  fake_cxx("exit 1")
  leaf = tmp_path / "made" / "by" / "jaxbn"
  monkeypatch.setenv("JAXBN_CACHE_DIR", str(leaf))
  previous = os.umask(0)
  try:
    status = kernel_library._load()
  finally:
    os.umask(previous)
  assert "exited with 1" in status.reason  # got as far as compiling in the directory
  for directory in (leaf, leaf.parent, leaf.parent.parent):
    mode = directory.stat().st_mode
    assert mode & 0o022 == 0, f"{directory} is {oct(mode)}"


@pytest.mark.skipif(C_COMPILER is None, reason="no C compiler to build a planted library")
def test_a_library_swapped_after_its_digest_is_checked_is_not_what_loads(
    tmp_path, cache, fake_cxx, good_library, registered, monkeypatch):
  library = _library_path(fake_cxx("exit 1"))
  # A verified build in the cache, not yet loaded by this process (the loader would answer a
  # second load of the same name with the library it already has).
  data = good_library.read_bytes()
  shutil.copy(good_library, library)
  kernel_cache.write_atomically(kernel_cache.digest_path(library),
                                  kernel_cache.digest(library, data))
  marker, planted = tmp_path / "constructor-ran", tmp_path / "planted.so"
  _plant(tmp_path, planted, marker)
  load = kernel_library.ctypes.CDLL
  loaded = []

  def swap_then_load(name, *args, **kwargs):
    os.replace(planted, library)  # after the digest check, before dlopen
    loaded.append(load(name, *args, **kwargs))
    return loaded[-1]

  monkeypatch.setattr(kernel_library.ctypes, "CDLL", swap_then_load)
  status = kernel_library._load()
  assert not marker.exists(), "the library swapped in after the check was loaded"
  assert status.available, status.reason
  assert all(hasattr(loaded[0], symbol) for symbol in kernel_library.TARGETS.values())


@pytest.mark.skipif(C_COMPILER is None, reason="no C compiler to build a planted library")
def test_a_later_load_in_the_process_maps_the_file_it_verified(
    tmp_path, fake_cxx, good_library, registered, monkeypatch):
  marker = tmp_path / "constructor-ran"
  _plant(tmp_path, tmp_path / "planted.so", marker)
  fake_cxx("exit 1")
  statuses = []
  # Two caches, each holding a library with a valid digest and not yet loaded by this
  # process: the real kernels, then the planted library, whose constructor tells whether the
  # loader mapped it or answered with the library the first load left behind.
  for name, source in (("first", good_library), ("second", tmp_path / "planted.so")):
    directory = tmp_path / name
    directory.mkdir()
    directory.chmod(0o755)
    monkeypatch.setenv("JAXBN_CACHE_DIR", str(directory))
    library = _library_path(Path(os.environ["CXX"]))
    shutil.copy(source, library)
    library.chmod(0o755)
    kernel_cache.write_atomically(kernel_cache.digest_path(library),
                                    kernel_cache.digest(library, library.read_bytes()))
    statuses.append(kernel_library._load())
  assert statuses[0].available, statuses[0].reason
  assert marker.exists(), "the loader answered with the earlier library"
  assert not statuses[1].available and "undefined symbol: Jaxbn" in statuses[1].reason


# ----------------------------------------------------------------------------------------
# The compiler.


def test_non_utf8_diagnostics_fall_back_with_one_warning(cache, fake_cxx, caplog):
  fake_cxx(r"printf 'erreur: \351chec \340 la compilation\n' >&2; exit 1")  # Latin-1 bytes
  status = kernel_library._load()
  assert not status.available
  assert "exited with 1: erreur: \ufffdchec \ufffd la compilation" in status.reason
  assert len([w for w in _warnings(caplog) if "unavailable" in w]) == 1


def test_status_never_raises_and_decides_once_per_process(monkeypatch, caplog):
  calls = []

  def broken(compiler):
    calls.append(compiler)
    raise ValueError("something nobody foresaw")

  monkeypatch.setattr(kernel_build, "verified_library", broken)
  monkeypatch.setattr(kernel_library, "_status", None)
  monkeypatch.delenv("JAXBN_CPU_KERNEL", raising=False)
  monkeypatch.setenv("CXX", "c++")
  for _ in range(3):
    status = kernel_library.status()
    assert not status.available and "something nobody foresaw" in status.reason
  assert len(calls) == 1
  assert len(_warnings(caplog)) == 1


@pytest.mark.parametrize("cxx,reason,fix", [
    (None, "no C++ compiler found", "install g++"),
    ("/nonexistent/c++", "build or load failed", "check the compiler"),
])
def test_without_a_compiler_one_warning_names_the_fix(tmp_path, cache, monkeypatch, caplog,
                                                      cxx, reason, fix):
  if cxx is None:
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no c++, g++ or clang++ on it
  else:
    monkeypatch.setenv("CXX", cxx)
  status = kernel_library._load()
  assert not status.available and reason in status.reason
  [warning] = _warnings(caplog)
  assert "pure-JAX path" in warning and reason in warning and fix in warning


@pytest.mark.slow
def test_a_hanging_compiler_is_killed_with_its_children(tmp_path, cache, fake_cxx,
                                                         monkeypatch):
  pid_file = tmp_path / "child.pid"
  # The compiler's own child, as a real driver (cc1plus, ld) would have.
  fake_cxx(f'sleep 60 & echo $! > "{pid_file}"; wait')
  monkeypatch.setenv("JAXBN_COMPILE_TIMEOUT", "2")
  start = time.monotonic()
  status = kernel_library._load()
  assert time.monotonic() - start < 40  # bounded by the timeout, not by the compiler
  assert not status.available
  assert "ran for more than 2 s and was killed" in status.reason
  assert not list(cache.glob("*.partial")), "the killed build left its partial file"
  child = int(pid_file.read_text())
  deadline = time.monotonic() + 10
  while _alive(child) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not _alive(child), "the compiler's child outlived the build"


def test_the_next_build_removes_partials_that_dead_builds_left(cache, fake_cxx, monkeypatch):
  fake_cxx("exit 1")
  monkeypatch.setenv("JAXBN_COMPILE_TIMEOUT", "60")
  stale, fresh = cache / "batch_norm_cpu-dead.so.partial", cache / "batch_norm_cpu-live.so.partial"
  stale.write_bytes(b"half a library")
  fresh.write_bytes(b"being written")
  hour_ago = time.time() - 3600
  os.utime(stale, (hour_ago, hour_ago))
  assert not kernel_library._load().available
  assert not stale.exists()
  assert fresh.exists()  # younger than the timeout: a build may still be writing it


@pytest.mark.slow
def test_waiting_for_another_process_build_is_bounded(tmp_path, cache, fake_cxx, monkeypatch):
  marker = tmp_path / "compiled"
  fake_cxx(f'touch "{marker}"; exit 1')
  monkeypatch.setenv("JAXBN_COMPILE_TIMEOUT", "1")
  with open(cache / kernel_build.LOCK_FILE, "w") as held:
    fcntl.flock(held, fcntl.LOCK_EX)  # another process building
    start = time.monotonic()
    status = kernel_library._load()
    assert time.monotonic() - start < 40
  assert not status.available and "build lock" in status.reason
  assert not marker.exists(), "two processes compiled at once"


def test_a_bad_compile_timeout_is_warned_about_and_the_default_used(monkeypatch, caplog):
  monkeypatch.setenv("JAXBN_COMPILE_TIMEOUT", "soon")
  assert kernel_build._compile_timeout() == kernel_build.DEFAULT_COMPILE_TIMEOUT_S
  [warning] = _warnings(caplog)
  assert "JAXBN_COMPILE_TIMEOUT='soon'" in warning


# ----------------------------------------------------------------------------------------
# JAXBN_CPU_KERNEL.


@pytest.mark.parametrize("value", ["0", "false", "False", "NO", "off", " off "])
def test_every_spelling_of_off_disables_the_kernels_silently(tmp_path, cache, fake_cxx,
                                                              monkeypatch, caplog, value):
  marker = tmp_path / "compiled"
  fake_cxx(f'touch "{marker}"; exit 1')
  monkeypatch.setenv("JAXBN_CPU_KERNEL", value)
  status = kernel_library._load()
  assert not status.available and status.reason == f"disabled by JAXBN_CPU_KERNEL={value}"
  assert not marker.exists() and not _warnings(caplog)


@pytest.mark.parametrize("value", ["", "1", "true", "Yes", "ON"])
def test_every_spelling_of_on_leaves_the_kernels_on(monkeypatch, caplog, value):
  monkeypatch.setenv("JAXBN_CPU_KERNEL", value)
  assert kernel_library._disabled() is None
  assert not _warnings(caplog)


def test_an_unknown_value_is_taken_as_off_with_a_warning(monkeypatch, caplog):
  monkeypatch.setenv("JAXBN_CPU_KERNEL", "disable")
  assert "taken as off" in kernel_library._disabled()
  [warning] = _warnings(caplog)
  assert "JAXBN_CPU_KERNEL='disable'" in warning


# ----------------------------------------------------------------------------------------
# When batch_norm asks for the kernels.


def test_zero_features_give_the_same_empty_answer_on_both_paths():
  x = jnp.zeros((4, 0), jnp.float32)

  def loss(x, use_cpu_kernel):
    return jnp.sum(jaxbn.batch_norm(x, use_cpu_kernel=use_cpu_kernel)[0] ** 2)

  for use_cpu_kernel in (None, False):
    y, stats = jaxbn.batch_norm(x, use_cpu_kernel=use_cpu_kernel)
    assert y.shape == (4, 0) and stats.mean.shape == stats.var.shape == (0,)
    assert jax.grad(loss)(x, use_cpu_kernel).shape == (4, 0)
  # True promises the kernels ran; with nothing to compute they did not.
  with pytest.raises(ValueError, match="is empty: there is nothing to compute"):
    jaxbn.batch_norm(x, use_cpu_kernel=True)


def test_no_build_unless_the_default_backend_is_cpu(monkeypatch):
  def build():
    raise AssertionError("built the CPU kernels for a GPU host")

  monkeypatch.setattr(kernel_calls, "available", build)
  monkeypatch.setattr(kernel_calls, "status", build)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 3)), jnp.float32)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x)[0] ** 3)))
  assert "jaxbn_" not in grad.lower(x).as_text()
  with pytest.raises(ValueError, match="default backend is gpu"):
    jaxbn.batch_norm(x, use_cpu_kernel=True)
