"""Zero-install: run asyncdist on a host whose Python lacks it (RPyC's zerodeploy).

::

    env = await ensure_remote_python(conn, "node1", "/usr/bin/python3", timeout=60.0)
    try:
        ...  # start roles with env.python
    finally:
        await cleanup_remote(conn, env)

If ``PYTHON -c "import asyncdist"`` works on the host and gives this version,
that Python is used as it is. Otherwise asyncdist is shipped:

1. Here, :func:`build_wheelhouse` gathers one wheel per distribution:
   asyncdist itself, packed from the source files this process runs (never
   fetched from an index), and each runtime dependency (compiled ones
   included) plus pip, in the version installed here. The dependency wheels
   come from ``pip download --only-binary=:all: --no-deps NAME==VERSION``,
   once, into a cache keyed by this environment
   (``~/.cache/asyncdist/wheelhouse-<key>``); a wheel pip cannot fetch is
   repacked from the installed files.
2. There, :func:`ensure_remote_python` makes a private directory
   (``mktemp -d`` in ``$TMPDIR``, named ``asyncdist-`` and ten random characters, mode 0700, with a marker
   file), uploads the wheels over SFTP, makes a venv with ``--without-pip``
   (so neither ensurepip nor Debian's ``python3-venv`` is needed) and runs
   pip from its shipped wheel: ``pip install --no-index --find-links WHEELS
   asyncdist==VERSION``, ignoring the host's pip configuration. It then
   checks that the venv's Python imports asyncdist.
3. :func:`cleanup_remote` removes that directory, and only a directory that
   has the marker and lies directly in the host's temporary directory.

The remote Python must be the same implementation, minor version and machine
as this one (compiled wheels are built for it); a host that cannot use the
wheels is told apart before anything is uploaded. Every failure is a
:class:`~asyncdist.errors.DeployError` naming the host and the step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import fcntl
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncssh

from ._log import get_logger
from ._version import __version__
from .errors import DeployError

__all__ = [
    "RemoteEnv",
    "build_wheelhouse",
    "cleanup_remote",
    "ensure_remote_python",
    "remote_python",
    "wheelhouse_dir",
]

log = get_logger("asyncdist.deploy")

_PROJECT: Final = "asyncdist"
#: The package directory this process runs; its files make asyncdist's own wheel.
_PACKAGE_DIR: Final = Path(__file__).resolve().parent
_LOCAL: Final = "localhost"
#: The remote directory's name: this prefix and ten random characters, in ``$TMPDIR``.
_TEMP_PREFIX: Final = "asyncdist-"
#: mktemp's template for it (each X becomes a random character).
_TEMP_TEMPLATE: Final = _TEMP_PREFIX + "X" * 10
_TEMP_NAME: Final = re.compile(r"^asyncdist-[A-Za-z0-9]{10}$")
_MARKER_FILE: Final = ".asyncdist-deploy"
_PROBE_MARKER: Final = "asyncdist-probe "
#: The first line of each remote command: its login shell's pid, which is its process group.
_PID_MARKER: Final = "asyncdist-deploy-pid "
#: Run by the remote Python: one line describing it, whether asyncdist imports or not.
_PROBE: Final = """\
import json, platform, sys
info = {"implementation": sys.implementation.name, "version": list(sys.version_info[:2]),
        "machine": platform.machine(), "libc": list(platform.libc_ver()), "executable": sys.executable}
try:
    import asyncdist
    info["asyncdist"] = str(getattr(asyncdist, "__version__", "unknown"))
except Exception as exc:
    info["asyncdist_error"] = "%s: %s" % (type(exc).__name__, exc)
print("asyncdist-probe " + json.dumps(info), flush=True)
"""
_ZIP_DATE: Final = (1980, 1, 1, 0, 0, 0)
_SKIPPED_DIST_INFO: Final = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"})


# -- the wheelhouse (here) ---------------------------------------------------------------------


def _canonical(name: str) -> str:
    """The PEP 503 form of a project name: ``Typing_Extensions`` -> ``typing-extensions``."""
    return re.sub(r"[-_.]+", "-", name).lower()


_REQUIREMENT: Final = re.compile(r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(?:\[([^\]]*)\])?")
_EXTRA_IN_MARKER: Final = re.compile(r"""\bextra\s*==\s*['"]([^'"]+)['"]""")


def _requirements(
    dist: importlib.metadata.Distribution, extras: frozenset[str]
) -> list[tuple[str, frozenset[str]]]:
    """The (name, extras) that ``dist`` requires at run time: no optional extra unless asked for.

    Other markers are not evaluated: what they exclude here is not installed
    here either, and an installed one that is not needed only costs a wheel.
    """
    result = []
    for requirement in dist.requires or ():
        spec, _, marker = requirement.partition(";")
        wanted = {_canonical(e) for e in _EXTRA_IN_MARKER.findall(marker)}
        if wanted and not wanted & extras:
            continue
        match = _REQUIREMENT.match(spec)
        if match is not None:
            names = frozenset(_canonical(e) for e in (match[2] or "").split(",") if e.strip())
            result.append((match[1], names))
    return result


def _project_distribution() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(_PROJECT)
    except importlib.metadata.PackageNotFoundError:
        raise DeployError(
            _LOCAL, "asyncdist is not installed here (no metadata): install it, e.g. pip install -e ."
        ) from None


def _runtime_dependencies() -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions that asyncdist needs at run time, and pip: canonical name -> it.

    Follows ``Requires-Dist`` from asyncdist's metadata through every
    distribution installed here; a requirement that is not installed here is
    skipped (its marker excludes this environment).
    """
    found: dict[str, importlib.metadata.Distribution] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [*_requirements(_project_distribution(), frozenset()), ("pip", frozenset())]
    while todo:
        name, extras = todo.pop()
        key = (_canonical(name), extras)
        if key in seen or key[0] == _PROJECT:
            continue
        seen.add(key)
        try:
            dist = found.get(key[0]) or importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            if key[0] == "pip":
                raise DeployError(
                    _LOCAL, "pip is not installed here: it is needed to build the wheelhouse"
                ) from None
            continue
        found[key[0]] = dist
        todo.extend(_requirements(dist, extras))
    return found


def _environment_key(deps: Mapping[str, importlib.metadata.Distribution]) -> str:
    data = {
        "implementation": sys.implementation.cache_tag,
        "platform": sysconfig.get_platform(),
        "soabi": sysconfig.get_config_var("SOABI"),
        "source": str(_PACKAGE_DIR),
        "dependencies": sorted(f"{name}=={dist.version}" for name, dist in deps.items()),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "asyncdist"


def wheelhouse_dir() -> Path:
    """The cache directory of this environment's wheelhouse (it may not exist yet).

    ``$XDG_CACHE_HOME/asyncdist/wheelhouse-<key>`` (default ``~/.cache``),
    where the key hashes the interpreter (implementation, platform, ABI), the
    source directory of the running asyncdist, and the name and version of
    every runtime dependency installed here: a change of any of them starts a
    new cache.
    """
    return _cache_root() / f"wheelhouse-{_environment_key(_runtime_dependencies())}"


def _wheel_name_version(filename: str) -> tuple[str, str] | None:
    if not filename.endswith(".whl"):
        return None
    parts = filename[:-4].split("-")
    if len(parts) not in (5, 6):
        return None
    return _canonical(parts[0]), parts[1]


def _find_wheel(directory: Path, name: str, version: str) -> Path | None:
    for path in sorted(directory.glob("*.whl")):
        found = _wheel_name_version(path.name)
        if found is not None and found[0] == name and found[1].lower() == version.lower():
            return path
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (between processes and between threads alike)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pip_download(directory: Path, deps: Mapping[str, importlib.metadata.Distribution]) -> str:
    """``pip download`` the installed versions as wheels into ``directory``; pip's output if it failed."""
    specs = [f"{dist.metadata['Name']}=={dist.version}" for dist in deps.values()]
    command = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps"]
    command += ["--disable-pip-version-check", "--no-input", "--quiet", "--dest", str(directory), *specs]
    log.debug("running %s", shlex.join(command))
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    return "" if done.returncode == 0 else (done.stderr or done.stdout).strip()


def _fetch_wheels(cache: Path, missing: Mapping[str, importlib.metadata.Distribution]) -> None:
    """Download the wheels of ``missing`` into ``cache``; repack from installed files what pip cannot get."""
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        errors = {}
        if _pip_download(Path(tmp), missing):
            for name, dist in missing.items():  # one at a time, to learn which failed
                if _find_wheel(Path(tmp), name, dist.version) is None:
                    errors[name] = _pip_download(Path(tmp), {name: dist})
        for path in Path(tmp).glob("*.whl"):
            os.replace(path, cache / path.name)
    for name, dist in missing.items():
        if _find_wheel(cache, name, dist.version) is None:
            log.info("pip download %s==%s failed; repacking the installed files", name, dist.version)
            try:
                _repack_installed(dist, cache)
            except DeployError as exc:
                tail = errors.get(name, "")[-500:]
                raise DeployError(_LOCAL, f"{exc.reason}; pip download said: {tail}") from exc


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _write_wheel(path: Path, dist_info: str, members: Sequence[tuple[str, bytes, int]]) -> Path:
    """Write a wheel of ``members`` (name, data, mode) plus its RECORD; same bytes for same input.

    The file is replaced atomically, and only when its content changes.
    """
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data, _ in members:
        writer.writerow([name, _record_hash(data), len(data)])
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    entries = [*members, (f"{dist_info}/RECORD", record.getvalue().encode(), 0o644)]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    content = buffer.getvalue()
    if path.exists() and path.read_bytes() == content:
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)
    return path


def _mode(path: Path) -> int:
    return 0o755 if os.stat(path).st_mode & 0o111 else 0o644


def _repack_installed(dist: importlib.metadata.Distribution, directory: Path) -> Path:
    """A wheel made of ``dist``'s installed files (those under its site directory), in ``directory``.

    Needs the ``WHEEL`` file (its tags) and ``RECORD`` that pip leaves when it
    installs a wheel. Compiled extensions are copied as they are; ``.pyc``
    files are left out; scripts outside the site directory are dropped
    (console scripts come back from ``entry_points.txt``).
    """
    name = dist.metadata["Name"]
    what = f"a wheel of {name} {dist.version}"
    wheel_text = dist.read_text("WHEEL")
    files = dist.files
    if not wheel_text or not files:
        raise DeployError(_LOCAL, f"cannot make {what}: it was not installed from a wheel (no WHEEL/RECORD)")
    tags = [line.partition(":")[2].strip() for line in wheel_text.splitlines() if line.startswith("Tag:")]
    dist_infos = {f.parts[0] for f in files if f.parts and f.parts[0].endswith(".dist-info")}
    if not tags or len(dist_infos) != 1:
        raise DeployError(_LOCAL, f"cannot make {what}: its WHEEL has no tag, or its RECORD no .dist-info")
    dist_info = dist_infos.pop()
    members = []
    for file in sorted(files, key=str):
        parts = file.parts
        if not parts or parts[0] == ".." or Path(str(file)).is_absolute() or "__pycache__" in parts:
            continue
        if file.suffix in (".pyc", ".pyo") or (parts[0] == dist_info and parts[-1] in _SKIPPED_DIST_INFO):
            continue
        local = Path(str(dist.locate_file(file)))
        try:
            members.append((file.as_posix(), local.read_bytes(), _mode(local)))
        except OSError as exc:
            raise DeployError(_LOCAL, f"cannot make {what}: {exc}") from exc
    if not any(name.split("/")[0] != dist_info for name, _, _ in members):
        raise DeployError(
            _LOCAL, f"cannot make {what}: none of its files is in its site directory (editable?)"
        )
    python_tags, abi_tags, platform_tags = ({t.split("-")[i]: None for t in tags} for i in range(3))
    tag = "-".join(".".join(part) for part in (python_tags, abi_tags, platform_tags))
    stem = dist_info.removesuffix(".dist-info")
    return _write_wheel(directory / f"{stem}-{tag}.whl", dist_info, members)


def _build_own_wheel(directory: Path) -> Path:
    """asyncdist's wheel, packed from the package directory this process runs (every subpackage).

    Its metadata is the installed one, with this source's ``__version__``.
    Built on every call (a few milliseconds), so that an editable install
    ships its current code; the file changes only when the code does.
    """
    dist = _project_distribution()
    metadata = dist.read_text("METADATA")
    if not metadata:
        raise DeployError(_LOCAL, "asyncdist's installed metadata has no METADATA file")
    metadata = re.sub(r"(?m)^Version: .*$", f"Version: {__version__}", metadata, count=1)
    dist_info = f"{_PROJECT}-{__version__}.dist-info"
    members = []
    for path in sorted(_PACKAGE_DIR.rglob("*")):
        relative = path.relative_to(_PACKAGE_DIR)
        if "__pycache__" in relative.parts or not path.is_file():
            continue
        if path.suffix in (".py", ".pyi") or path.name == "py.typed":
            members.append((f"{_PROJECT}/{relative.as_posix()}", path.read_bytes(), 0o644))
    wheel = f"Wheel-Version: 1.0\nGenerator: asyncdist._deploy ({__version__})\nRoot-Is-Purelib: true\n"
    members.append((f"{dist_info}/METADATA", metadata.encode(), 0o644))
    members.append((f"{dist_info}/WHEEL", (wheel + "Tag: py3-none-any\n").encode(), 0o644))
    entry_points = dist.read_text("entry_points.txt")
    if entry_points:
        members.append((f"{dist_info}/entry_points.txt", entry_points.encode(), 0o644))
    return _write_wheel(directory / f"{_PROJECT}-{__version__}-py3-none-any.whl", dist_info, members)


def build_wheelhouse(dest: Path | None = None) -> list[Path]:
    """Wheels for asyncdist and each of its runtime dependencies as installed here, and pip.

    Returns one path per distribution, all in ``dest`` (default: the cache,
    :func:`wheelhouse_dir`). The dependency wheels are fetched into the
    cache once (``pip download --only-binary=:all: --no-deps NAME==VERSION``:
    PyPI or whatever index pip is configured with here), or, if pip cannot
    get one, repacked from the installed files; later calls find them there
    and need no network. asyncdist's own wheel is packed from the running
    source on each call. Files are hard-linked (or copied) from the cache into
    another ``dest``. Blocking (subprocess, files): from async code, call it
    in a thread (``asyncio.to_thread``). Safe to call from several processes
    at once (a lock file in the cache). Raises :class:`DeployError` (host
    ``localhost``) if a wheel can be neither fetched nor repacked.
    """
    started = time.perf_counter()
    deps = _runtime_dependencies()
    cache = _cache_root() / f"wheelhouse-{_environment_key(deps)}"
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        missing = {
            name: dist for name, dist in deps.items() if _find_wheel(cache, name, dist.version) is None
        }
        if missing:
            log.info("fetching wheels into %s: %s", cache, ", ".join(sorted(missing)))
            _fetch_wheels(cache, missing)
        wheels = []
        for name, dist in sorted(deps.items()):
            found = _find_wheel(cache, name, dist.version)
            if found is None:  # pragma: no cover - _fetch_wheels raised already
                raise DeployError(_LOCAL, f"no wheel of {name} {dist.version}")
            wheels.append(found)
        target = cache if dest is None else Path(dest)
        target.mkdir(parents=True, exist_ok=True)
        own = _build_own_wheel(target)
    if target.resolve() != cache.resolve():
        copies = []
        for wheel in wheels:
            copy = target / wheel.name
            if not (copy.exists() and os.path.samefile(copy, wheel)):
                tmp = target / f".{wheel.name}.{os.getpid()}.tmp"
                try:
                    os.link(wheel, tmp)
                except OSError:
                    shutil.copyfile(wheel, tmp)
                os.replace(tmp, copy)
            copies.append(copy)
        wheels = copies
    log.debug(
        "wheelhouse ready in %.2f s: %d wheels in %s", time.perf_counter() - started, len(wheels) + 1, target
    )
    return [own, *wheels]


# -- the host (there) --------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteEnv:
    """The Python that runs asyncdist on a host, made or found by :func:`ensure_remote_python`.

    ``python`` is an absolute path there. ``tempdir`` is the directory that
    was made for it (holding ``venv/`` and ``wheels/``), or None when the
    host's own Python already had asyncdist; :func:`cleanup_remote` removes
    it. ``host`` is the label that errors name.
    """

    python: str
    tempdir: str | None = None
    host: str = ""

    @property
    def deployed(self) -> bool:
        """Whether asyncdist was shipped (and so there is a directory to remove)."""
        return self.tempdir is not None


def _shell_prefix(cwd: str | None, env: Mapping[str, str] | None) -> str:
    prefix = f"cd {shlex.quote(cwd)} && " if cwd else ""
    if env:
        for name in env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"bad environment variable name {name!r}")
        prefix += "env " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " "
    return prefix


def _tail(text: str, lines: int = 8) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return "\n".join(kept)


def _is_our_name(tempdir: str) -> bool:
    return (
        posixpath.isabs(tempdir)
        and posixpath.normpath(tempdir) == tempdir
        and bool(_TEMP_NAME.match(posixpath.basename(tempdir)))
    )


@dataclass(frozen=True)
class _Done:
    exit_status: int | None
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return _tail(self.stderr + "\n" + self.stdout)


class _Session:
    """Runs the steps on one host: names the step under way, and can kill what it runs there.

    Each command's login shell prints its pid first; OpenSSH makes it the
    leader of its own session and process group, so ``kill -KILL -- -PGID``
    over another channel stops the whole step (for root logins too, where
    OpenSSH ignores signal requests). Closing the channel would not: the
    process would go on, orphaned.
    """

    def __init__(self, conn: asyncssh.SSHClientConnection, host: str) -> None:
        self.conn = conn
        self.host = host
        self.step = ""
        self._pgid: int | None = None

    def error(self, reason: str, output: str = "") -> DeployError:
        return DeployError(self.host, reason + (f"\n{output}" if output else ""))

    async def run(self, step: str, command: str) -> _Done:
        """Run ``command`` through the login shell (stdin closed); its exit status and output."""
        self.step = step
        log.debug("%s: %s", self.host, step)
        try:
            proc = await self.conn.create_process(
                f"echo {_PID_MARKER}$$; {command}", encoding="utf-8", errors="replace"
            )
        except (asyncssh.Error, OSError) as exc:
            raise self.error(f"{step}: {exc}") from exc
        try:
            proc.stdin.write_eof()
            head = []
            while line := await proc.stdout.readline():
                if line.startswith(_PID_MARKER):  # lines before it come from the login shell's rc files
                    with contextlib.suppress(ValueError):
                        self._pgid = int(line[len(_PID_MARKER) :])
                    break
                head.append(line)
            stdout, stderr = await proc.communicate()
        except (asyncssh.Error, OSError) as exc:
            raise self.error(f"{step}: {exc}") from exc
        finally:
            proc.close()
        self._pgid = None
        return _Done(proc.exit_status, "".join(head) + str(stdout or ""), str(stderr or ""))

    async def kill_running(self) -> None:
        """Kill the process group of an interrupted step, if any (best effort, a few seconds at most)."""
        pgid, self._pgid = self._pgid, None
        if pgid is None or pgid <= 1:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await self.conn.run(f"kill -KILL -- -{pgid}", check=False)

    async def probe(self, step: str, python: str, prefix: str) -> dict[str, Any]:
        """What the Python at ``python`` is, and whether (which) asyncdist it imports."""
        done = await self.run(step, f"{prefix}{shlex.quote(python)} -c {shlex.quote(_PROBE)}")
        for line in done.stdout.splitlines():
            if line.startswith(_PROBE_MARKER):
                with contextlib.suppress(ValueError):
                    info = json.loads(line[len(_PROBE_MARKER) :])
                    if isinstance(info, dict):
                        return info
        if done.exit_status == 127:
            reason = f"no Python at {python}"
        elif done.exit_status == 126:
            reason = f"{python} cannot be executed"
        elif prefix.startswith("cd ") and "cd:" in done.output:
            reason = f"{step}: cannot change to the working directory"
        else:
            reason = f"{step}: {python} failed (exit status {done.exit_status})"
        raise self.error(reason, done.output)

    async def make_tempdir(self) -> str:
        """A new directory in ``$TMPDIR`` named from :data:`_TEMP_TEMPLATE` (mode 0700), with
        ``wheels/`` and the marker file."""
        script = (
            'root="${TMPDIR:-/tmp}"; root="${root%/}"; umask 077'
            f' && d=$(mktemp -d "$root/{_TEMP_TEMPLATE}")'
            f' && mkdir "$d/wheels" && echo "made by asyncdist" > "$d/{_MARKER_FILE}" && echo "$d"'
        )
        done = await self.run("making a temporary directory", f"sh -c {shlex.quote(script)}")
        words = done.stdout.split()
        tempdir = words[-1] if words else ""
        if done.exit_status != 0 or not _is_our_name(tempdir):
            raise self.error(f"{self.step} failed (exit status {done.exit_status})", done.output)
        return tempdir

    async def upload(self, wheels: Sequence[Path], to: str) -> None:
        self.step = f"uploading {len(wheels)} wheels over SFTP"
        log.debug("%s: %s", self.host, self.step)
        try:
            async with self.conn.start_sftp_client() as sftp:
                await sftp.put([str(w) for w in wheels], to)
        except (asyncssh.Error, OSError) as exc:
            raise self.error(f"{self.step}: {exc}") from exc

    async def remove_tempdir(self, tempdir: str) -> None:
        """``rm -rf`` a directory that :meth:`make_tempdir` made; refuse any other."""
        if not _is_our_name(tempdir):
            raise self.error(f"refusing to remove {tempdir!r}: not a directory asyncdist makes")
        script = (
            'd="$1"; root="${TMPDIR:-/tmp}"; root="${root%/}"'
            '; [ "${d%/*}" = "$root" ] || exit 3'
            '; [ -e "$d" ] || [ -L "$d" ] || exit 0'
            f'; [ -d "$d" ] && [ ! -L "$d" ] && [ -f "$d/{_MARKER_FILE}" ] || exit 4'
            '; rm -rf -- "$d"'
        )
        command = f"sh -c {shlex.quote(script)} sh {shlex.quote(tempdir)}"
        done = await self.run(f"removing {tempdir}", command)
        if done.exit_status == 3:
            raise self.error(f"refusing to remove {tempdir}: not in the host's temporary directory")
        if done.exit_status == 4:
            raise self.error(f"refusing to remove {tempdir}: it has no {_MARKER_FILE} marker")
        if done.exit_status != 0:
            raise self.error(f"cannot remove {tempdir} (exit status {done.exit_status})", done.output)

    async def deploy(
        self, python: str, prefix: str, env_prefix: str, wheels: Sequence[Path], tempdir: str
    ) -> str:
        """Upload, make the venv, install, check; the venv's Python.

        The venv and pip run in ``tempdir`` with the role's environment
        (``env_prefix``); the check runs as a role would (``prefix``: its
        working directory too).
        """
        q = shlex.quote
        wheel_dir, venv = f"{tempdir}/wheels", f"{tempdir}/venv"
        venv_python = f"{venv}/bin/python"
        timer = time.perf_counter()
        await self.upload(wheels, wheel_dir)
        log.debug("%s: upload took %.2f s", self.host, time.perf_counter() - timer)

        # With pip's wheel at hand: no ensurepip (Debian's python3-venv); pip runs from its wheel.
        pip_wheels = [w.name for w in wheels if (_wheel_name_version(w.name) or ("",))[0] == "pip"]
        without_pip = " --without-pip" if pip_wheels else ""
        command = f"cd {q(tempdir)} && {env_prefix}{q(python)} -m venv{without_pip} {q(venv)}"
        done = await self.run("creating a venv", command)
        if done.exit_status != 0:
            if "ensurepip" in done.output:
                reason = "ensurepip/venv not available: install python3-venv"
            elif "No module named venv" in done.output:
                reason = f"the venv module is not available for {python}: install python3-venv"
            else:
                reason = f"{self.step} failed (exit status {done.exit_status})"
            raise self.error(reason, done.output)
        log.debug("%s: venv made after %.2f s", self.host, time.perf_counter() - timer)

        pip = [venv_python, f"{wheel_dir}/{pip_wheels[0]}/pip"] if pip_wheels else [venv_python, "-m", "pip"]
        arguments = ["install", "--isolated", "--no-index", "--find-links", wheel_dir, "--only-binary=:all:"]
        arguments += ["--no-cache-dir", "--disable-pip-version-check", "--no-warn-script-location"]
        arguments += ["--quiet", f"{_PROJECT}=={__version__}"]
        command = f"cd {q(tempdir)} && PIP_CONFIG_FILE=/dev/null {env_prefix}{shlex.join([*pip, *arguments])}"
        done = await self.run("installing asyncdist with pip", command)
        if done.exit_status != 0:
            raise self.error(
                f"pip install asyncdist failed there (exit status {done.exit_status})", done.output
            )
        log.debug("%s: installed after %.2f s", self.host, time.perf_counter() - timer)

        info = await self.probe("checking the venv's Python", venv_python, prefix)
        if info.get("asyncdist") != __version__:
            error = info.get("asyncdist_error") or f"version {info.get('asyncdist')}"
            raise self.error(f"the new venv's Python does not import asyncdist {__version__}: {error}")
        return venv_python


def _describe(info: Mapping[str, Any]) -> str:
    version = ".".join(str(v) for v in info.get("version", ()))
    return f"{info.get('implementation')} {version} on {info.get('machine')}"


def _check_interpreter(host: str, python: str, info: Mapping[str, Any]) -> None:
    """The shipped wheels need the same implementation, minor version and machine as here."""
    here = {
        "implementation": sys.implementation.name,
        "version": list(sys.version_info[:2]),
        "machine": platform.machine(),
    }
    if any(info.get(key) != value for key, value in here.items()):
        raise DeployError(
            host,
            f"cannot ship asyncdist to {python}: it is {_describe(info)}, and the wheels from here are "
            f"for {_describe(here)}; use such a Python there, or install asyncdist on the host",
        )


_LEGACY_MANYLINUX: Final = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def _platform_fits(tag: str, machine: str, libc: tuple[str, tuple[int, ...]]) -> bool:
    """Whether a wheel's platform tag can run on ``machine`` with ``libc`` (name, version); unknown: yes."""
    if tag == "any":
        return True
    legacy = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_(\w+)", tag)
    modern = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", tag)
    if legacy is not None:
        need, arch = _LEGACY_MANYLINUX[legacy[1]], legacy[2]
    elif modern is not None:
        need, arch = (int(modern[1]), int(modern[2])), modern[3]
    elif tag.startswith("musllinux_"):
        return libc[0] != "glibc" and tag.endswith("_" + machine)
    elif tag.startswith("linux_"):
        return tag == f"linux_{machine}"
    else:
        return True
    return arch == machine and libc[0] == "glibc" and libc[1] >= need


def _check_wheels_fit(host: str, info: Mapping[str, Any], wheels: Sequence[Path]) -> None:
    """Refuse, before any upload, when a compiled wheel needs a newer glibc than the host has."""
    raw = info.get("libc") or ["", ""]
    name, version = str(raw[0]), str(raw[1])
    libc = (name, tuple(int(n) for n in re.findall(r"\d+", version)[:2]))
    machine = str(info.get("machine"))
    for wheel in wheels:
        platforms = wheel.name[:-4].split("-")[-1].split(".")
        if not any(_platform_fits(tag, machine, libc) for tag in platforms):
            have = f"{name} {version}".strip() or "an unknown libc"
            raise DeployError(host, f"cannot ship {wheel.name}: the host has {have} on {machine}")


async def ensure_remote_python(
    conn: asyncssh.SSHClientConnection,
    host_label: str,
    python: str,
    timeout: float,
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    wheelhouse: Sequence[Path] | None = None,
    match_version: bool = True,
) -> RemoteEnv:
    """A Python on the host that imports asyncdist: ``python`` itself, or a venv made for the purpose.

    ``python`` (an absolute path there) is probed first, run from ``cwd``
    with ``env`` as a role would be. If it imports asyncdist (of this
    version, unless ``match_version`` is false), the result is
    ``RemoteEnv(python, tempdir=None)`` and nothing is uploaded. Otherwise
    asyncdist and its dependencies are shipped as the module docstring
    tells, from ``wheelhouse`` (the paths :func:`build_wheelhouse` returns;
    by default it is built, or found in its cache, in a thread), and the
    result names the venv's Python and the directory to give to
    :func:`cleanup_remote`.

    ``timeout`` bounds the time spent waiting on the host, in all; building
    the wheelhouse here is not counted. Raises :class:`DeployError` naming
    ``host_label`` and the failed step: no Python at that path, a Python the
    wheels do not fit, no SFTP, venv or pip failures, timeout. On any
    failure, and on cancellation, the step under way there is killed (its
    process group) and the directory made there is removed (best effort,
    within a few seconds more).
    """
    if not posixpath.isabs(python):
        raise ValueError(f"the Python of {host_label} must be an absolute path, not {python!r}")
    prefix = _shell_prefix(cwd, env)
    session = _Session(conn, host_label)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    tempdir: str | None = None
    try:
        async with asyncio.timeout_at(deadline):
            info = await session.probe(f"probing {python}", python, prefix)
        found = info.get("asyncdist")
        if found is not None and (found == __version__ or not match_version):
            log.debug("%s: %s has asyncdist %s", host_label, python, found)
            return RemoteEnv(python, None, host_label)
        why = f"asyncdist {found} there, {__version__} here" if found else info.get("asyncdist_error")
        log.info("%s: shipping asyncdist to %s (%s)", host_label, python, why)
        _check_interpreter(host_label, python, info)
        started = loop.time()
        if wheelhouse is not None:
            wheels = list(wheelhouse)
        else:
            try:
                wheels = await asyncio.to_thread(build_wheelhouse)
            except DeployError as exc:
                raise DeployError(host_label, f"cannot build the wheelhouse here: {exc.reason}") from exc
        deadline += loop.time() - started
        _check_wheels_fit(host_label, info, wheels)
        async with asyncio.timeout_at(deadline):
            tempdir = await session.make_tempdir()
            venv_python = await session.deploy(python, prefix, _shell_prefix(None, env), wheels, tempdir)
    except BaseException as exc:
        step = session.step
        await session.kill_running()
        if tempdir is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10.0):
                    await session.remove_tempdir(tempdir)
        if isinstance(exc, TimeoutError):
            raise DeployError(host_label, f"{step}: not done within {timeout:g} s") from None
        raise
    return RemoteEnv(venv_python, tempdir, host_label)


async def cleanup_remote(conn: asyncssh.SSHClientConnection, env: RemoteEnv, timeout: float = 30.0) -> None:
    """Remove the directory that :func:`ensure_remote_python` made there; nothing if it made none.

    Removes ``env.tempdir`` only if it lies directly in the host's temporary
    directory (``$TMPDIR`` or ``/tmp``), has asyncdist's name pattern and
    holds the marker file; a directory already gone is fine (idempotent).
    Stop the roles that run from it first. Raises :class:`DeployError` if it
    refuses, if ``rm`` fails, or if the host does not answer within ``timeout``.
    """
    if env.tempdir is None:
        return
    host = env.host or str(conn.get_extra_info("peername", ("?",))[0])
    session = _Session(conn, host)
    try:
        async with asyncio.timeout(timeout):
            await session.remove_tempdir(env.tempdir)
    except BaseException as exc:
        await session.kill_running()
        if isinstance(exc, TimeoutError):
            raise DeployError(host, f"removing {env.tempdir}: not done within {timeout:g} s") from None
        raise


@contextlib.asynccontextmanager
async def remote_python(
    conn: asyncssh.SSHClientConnection,
    host_label: str,
    python: str,
    timeout: float,
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    wheelhouse: Sequence[Path] | None = None,
    match_version: bool = True,
) -> AsyncIterator[RemoteEnv]:
    """:func:`ensure_remote_python` on entry, :func:`cleanup_remote` on exit (same arguments).

    A failure to clean up is raised only when the body succeeded.
    """
    remote = await ensure_remote_python(
        conn,
        host_label,
        python,
        timeout,
        cwd=cwd,
        env=env,
        wheelhouse=wheelhouse,
        match_version=match_version,
    )
    try:
        yield remote
    except BaseException:
        with contextlib.suppress(DeployError):
            await cleanup_remote(conn, remote)
        raise
    await cleanup_remote(conn, remote)
