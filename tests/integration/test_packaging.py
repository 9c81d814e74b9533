"""The built wheel ships the twistd plugin, and a fresh venv with it runs ``twistd imgproxy``.

A plugin that fails to import, or is missing from the wheel, silently vanishes
from ``twistd --help``: only an installed wheel in a clean environment shows it.
The wheel is built (``python -m build``, which fetches its build backend from
PyPI) from a copy of the working tree, so the checkout gets no ``build/``
directory; the fresh venv gets the runtime dependencies from PyPI (pip's cache
makes that quick). Both happen once per run.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

import attrs
from twisted.trial.unittest import SynchronousTestCase

from tests.processes import REPOSITORY

# Every option of the contract's table.
CONTRACT_OPTIONS = (
    "--role", "--http", "--bind", "--advertise", "--gossip-port", "--node-name", "--join",
    "--cluster-secret", "--cache-dir", "--cache-max-bytes", "--cache-ttl", "--signing-key",
    "--allow-private-sources", "--allow-networks", "--max-source-bytes",
    "--max-source-pixels", "--fetch-timeout",
)


@attrs.frozen
class Installation:
    """A wheel built from the working tree and a fresh venv it is installed in."""

    wheel: Path
    venv: Path
    workdir: Path

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        """Run a program of the venv, away from the checkout and its environment."""
        environ = {
            name: value
            for name, value in os.environ.items()
            if name not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
        }
        return subprocess.run(
            [str(self.venv / "bin" / command[0]), *command[1:]],
            cwd=self.workdir,
            env=environ,
            capture_output=True,
            text=True,
            timeout=120,
        )


def _copy_working_tree(destination: Path) -> None:
    """Tracked and untracked-but-not-ignored files, as they are on disk now."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPOSITORY,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode("utf-8").split("\0")):
        source = REPOSITORY / name
        if not source.is_file():  # deleted in the working tree
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def _run_all(*commands: tuple[list[str], str]) -> None:
    """Run the commands side by side; AssertionError with the output of any that fails."""
    running = [
        (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), what)
        for command, what in commands
    ]
    failures = []
    for process, what in running:
        output, _ = process.communicate(timeout=300)
        if process.returncode != 0:
            failures.append(f"{what} failed ({process.returncode}):\n{output.decode()[-3000:]}")
    if failures:
        raise AssertionError("\n".join(failures))


def _pip_install(venv: Path, *arguments: str) -> list[str]:
    # This venv's pip installs into the fresh one; --no-compile saves most of the time.
    return [
        sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
        "--quiet", "--no-compile", "--disable-pip-version-check", *arguments,
    ]


_installation: Installation | None = None


def installation() -> Installation:
    """Build and install once per test run.

    The runtime dependencies (from ``pyproject.toml``) go into the fresh venv while
    the wheel builds; installing the wheel afterwards still checks them.
    """
    global _installation
    if _installation is None:
        root = Path(tempfile.mkdtemp(prefix="imgproxy-packaging-"))
        atexit.register(shutil.rmtree, root, True)
        source, dist, venv, workdir = (root / n for n in ("src", "dist", "venv", "work"))
        workdir.mkdir()
        _copy_working_tree(source)
        _run_all(([sys.executable, "-m", "venv", "--without-pip", str(venv)], "python -m venv"))
        with open(source / "pyproject.toml", "rb") as project:
            dependencies = tomllib.load(project)["project"]["dependencies"]
        _run_all(
            (
                [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(source)],
                "python -m build --wheel",
            ),
            (_pip_install(venv, *dependencies), "pip install of the dependencies"),
        )
        (wheel,) = dist.glob("imgproxy-*.whl")
        _run_all((_pip_install(venv, str(wheel)), "pip install of the wheel into a fresh venv"))
        _installation = Installation(wheel=wheel, venv=venv, workdir=workdir)
    return _installation


class WheelContentsTests(SynchronousTestCase):
    """What the wheel holds."""

    def test_the_wheel_ships_the_plugin_without_a_plugins_package(self) -> None:
        with zipfile.ZipFile(installation().wheel) as wheel:
            names = set(wheel.namelist())

        self.assertIn("twisted/plugins/imgproxy_plugin.py", names)
        self.assertIn("imgproxy/tap.py", names)
        # Either would shadow Twisted's own package in an installed environment.
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertNotIn("twisted/__init__.py", names)


class FreshVenvTests(SynchronousTestCase):
    """The wheel installed alone in a new venv."""

    def test_the_installed_package_is_the_wheel_not_the_checkout(self) -> None:
        result = installation().run("python", "-c", "import imgproxy; print(imgproxy.__file__)")

        self.assertEqual(result.returncode, 0, result.stderr)
        location = Path(result.stdout.strip()).resolve()
        self.assertTrue(location.is_relative_to(installation().venv.resolve()), location)

    def test_twistd_help_lists_imgproxy(self) -> None:
        result = installation().run("twistd", "--help")

        self.assertEqual(result.returncode, 0, result.stderr)
        commands = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
        self.assertIn("imgproxy", commands, result.stdout)

    def test_twistd_imgproxy_help_shows_every_contract_option(self) -> None:
        result = installation().run("twistd", "imgproxy", "--help")

        self.assertEqual(result.returncode, 0, result.stderr)
        shown = {
            word.partition("=")[0] for line in result.stdout.splitlines() for word in line.split()
        }
        for option in CONTRACT_OPTIONS:
            self.assertIn(option, shown, result.stdout)
