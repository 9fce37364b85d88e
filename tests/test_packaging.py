"""The installed wheel, not the source tree: the shipped configs and bench scripts, and the CLI run from elsewhere.

The wheel is built offline (``pip wheel --no-build-isolation --no-index``) from a copy of the tree and installed
into a fresh venv that sees the already-installed dependencies through a view of this interpreter's site-packages
without dflash_jax (no editable finder, no dist-info), so only the wheel can provide ``dflash_jax``.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "README.md", "dflash_jax", "configs", "scripts")  # what the build reads


def _names(pattern: str) -> set[str]:
    return {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, pattern))}


def _is_dflash_jax(entry: str) -> bool:
    """dflash_jax's package, dist-info and editable finder (``__editable__*``) in a site-packages directory."""
    return entry.lower().replace("-", "_").startswith(("dflash_jax", "__editable__"))


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """``(wheel, bin_dir, site_packages, env, cwd)`` of a fresh venv holding only the wheel of this tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        pip
        + [
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--check-build-dependencies",
            "--no-index",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        check=True,
    )
    (wheel,) = glob.glob(str(tmp / "dist" / "dflash_jax-*.whl"))

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True)
    bin_dir = str(tmp / "venv" / "bin")
    py = os.path.join(bin_dir, "python")
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = tmp / "deps"  # this interpreter's packages, less dflash_jax
    deps.mkdir()
    for lib in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in os.listdir(lib):
            if not _is_dflash_jax(entry) and not (deps / entry).exists():
                os.symlink(os.path.join(lib, entry), deps / entry)
    with open(os.path.join(site, "_dependencies.pth"), "w") as f:
        f.write(str(deps) + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["JAX_PLATFORMS"] = "cpu"
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    missing = subprocess.run([py, "-c", "import dflash_jax"], cwd=cwd, env=env, capture_output=True, text=True)
    assert "No module named 'dflash_jax'" in missing.stderr  # the venv sees neither this tree nor its editable
    subprocess.run(pip + ["--python", py, "install", "--no-deps", "--no-index", wheel], check=True)
    return wheel, bin_dir, site, env, cwd


def _run(venv, *args: str) -> subprocess.CompletedProcess:
    _, bin_dir, _, env, cwd = venv
    proc = subprocess.run(
        [os.path.join(bin_dir, args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_links_point_at_every_script():
    links = os.path.join(ROOT, "dflash_jax", "scripts")
    assert _names("dflash_jax/scripts/*") == _names("scripts/bench_*.py")
    for name in os.listdir(links):
        assert os.path.islink(os.path.join(links, name))
        assert os.path.realpath(os.path.join(links, name)) == os.path.join(os.path.realpath(ROOT), "scripts", name)
    assert os.path.realpath(os.path.join(ROOT, "dflash_jax", "configs")) == os.path.realpath(
        os.path.join(ROOT, "configs")
    )


def test_wheel_ships_the_configs_and_bench_scripts_only(venv):
    names = zipfile.ZipFile(venv[0]).namelist()
    shipped = lambda d: {os.path.basename(n) for n in names if n.startswith(f"dflash_jax/{d}/")}  # noqa: E731
    assert shipped("configs") == _names("configs/*.yaml") >= {"tiny.yaml", "smollm2-135m.yaml", "qwen3-8b.yaml"}
    assert shipped("scripts") == _names("scripts/bench_*.py") and "setup.sh" not in shipped("scripts")


def test_installed_package_resolves_its_own_files(venv):
    _, _, site, _, _ = venv
    out = _run(
        venv,
        "python",
        "-c",
        "import dflash_jax, dflash_jax.cli as c, dflash_jax.config as k; "
        "print(dflash_jax.__file__); print(k.resolve_config_path('tiny')); print(c._scripts_dir())",
    )
    for path in out.stdout.split():
        assert os.path.realpath(path).startswith(os.path.realpath(site) + os.sep), path


def test_installed_cli_help_bench_and_tiny_train(venv):
    assert "--run-dir" in _run(venv, "dflash-jax", "train", "--config", "tiny", "--help").stdout
    listed = _run(venv, "dflash-jax", "bench").stdout
    assert all(name in listed for name in ("draft", "loss", "target", "train_step"))
    assert "--shape" in _run(venv, "dflash-jax", "bench", "train_step", "--help").stdout  # imports bench_target
    _run(
        venv,
        "dflash-jax",
        "train",
        "--config",
        "tiny",
        "--run-dir",
        "run",
        "--set",
        "train.steps=2",
        "--set",
        "train.log_every=1",
        "--set",
        "data.max_conversations=16",
        "--no-progress",
    )
    with open(venv[4] / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
