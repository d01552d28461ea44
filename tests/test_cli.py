"""Tests for the `merit` command line: argument parsing, help output and dispatch."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from merit_jax import __version__, assets, cli


def _parse(*argv: str):  # type: ignore[no-untyped-def]
    return cli.build_parser().parse_args(list(argv))


def _usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv))
    assert info.value.code == 2
    return capsys.readouterr().err


# --- help and top level ----------------------------------------------------------


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: merit" in out
    assert "fetch" in out
    assert "generate" in out
    assert "--verbose" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"merit {__version__}"


def test_missing_subcommand_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(capsys)
    assert "COMMAND" in err


def test_verbose_counts() -> None:
    assert _parse("fetch").verbose == 0
    assert _parse("-v", "fetch").verbose == 1
    assert _parse("-vv", "fetch").verbose == 2


# --- fetch -------------------------------------------------------------------------


def test_fetch_help_lists_assets_and_cache(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["fetch", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in assets.ASSETS:
        assert name in out
    assert "--force" in out
    assert "MERIT_JAX_CACHE" in out


def test_fetch_parses_defaults() -> None:
    args = _parse("fetch")
    assert args.command == "fetch"
    assert args.names == []
    assert args.force is False
    assert args.func is cli.cmd_fetch


def test_fetch_parses_names_and_force() -> None:
    args = _parse("fetch", "bigbench", "smollm2-135m-instruct", "--force")
    assert args.names == ["bigbench", "smollm2-135m-instruct"]
    assert args.force is True


def test_fetch_unknown_name_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(capsys, "fetch", "bigbench", "gpt-17")
    assert "unknown asset 'gpt-17'" in err
    assert "smollm2-135m-instruct" in err


def test_fetch_defaults_to_all_assets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[str, bool]] = []

    def fake_fetch(name: str, *, force: bool = False) -> Path:
        calls.append((name, force))
        return Path("/cache") / name

    monkeypatch.setattr(assets, "fetch", fake_fetch)
    assert cli.main(["fetch"]) == 0
    assert calls == [(name, False) for name in sorted(assets.ASSETS)]
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{name}\t/cache/{name}" for name in sorted(assets.ASSETS)]


def test_fetch_passes_force(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool]] = []

    def fake_fetch(name: str, *, force: bool = False) -> Path:
        calls.append((name, force))
        return Path("/cache") / name

    monkeypatch.setattr(assets, "fetch", fake_fetch)
    assert cli.main(["fetch", "bigbench", "--force"]) == 0
    assert calls == [("bigbench", True)]


def test_fetch_asset_error_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing_fetch(name: str, *, force: bool = False) -> Path:
        raise assets.AssetDownloadError("pip download failed for asset 'bigbench'")

    monkeypatch.setattr(assets, "fetch", failing_fetch)
    assert cli.main(["fetch", "bigbench"]) == 1
    err = capsys.readouterr().err
    assert "merit fetch: error: pip download failed for asset 'bigbench'" in err


# --- generate ----------------------------------------------------------------------


def test_generate_defaults() -> None:
    args = _parse("generate", "smollm2-135m-instruct", "Hello")
    assert args.model == "smollm2-135m-instruct"
    assert args.prompt == "Hello"
    assert args.chat is True
    assert args.system is None
    assert args.max_new_tokens == 64
    assert args.temperature == 0.0
    assert args.top_p == 1.0
    assert args.seed == 0
    assert args.dtype == "float32"


def test_generate_options() -> None:
    args = _parse(
        "generate",
        "m",
        "p",
        "--no-chat",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.7",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--dtype",
        "bfloat16",
    )
    assert args.chat is False
    assert args.max_new_tokens == 5
    assert args.temperature == 0.7
    assert args.top_p == 0.9
    assert args.seed == 3
    assert args.dtype == "bfloat16"


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--max-new-tokens", "0", "must be a positive integer"),
        ("--temperature", "-1", "must be >= 0"),
        ("--temperature", "nan", "must be >= 0"),
        ("--top-p", "0", "must be in (0, 1]"),
        ("--top-p", "1.5", "must be in (0, 1]"),
        ("--dtype", "int8", "invalid choice"),
    ],
)
def test_generate_rejects_bad_values(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, expected: str
) -> None:
    err = _usage_error(capsys, "generate", "m", "p", flag, value)
    assert expected in err


def test_generate_system_without_chat(capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(capsys, "generate", "m", "p", "--no-chat", "--system", "Be brief.")
    assert "--system applies only with --chat" in err


def test_generate_calls_generate_text(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[tuple[object, ...], dict[str, object]]] = []

    def fake_generate_text(*args: object, **kwargs: object) -> str:
        calls.append((args, kwargs))
        return "Paris."

    fake_module = types.ModuleType("merit_jax.models.generate")
    fake_module.generate_text = fake_generate_text  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "merit_jax.models.generate", fake_module)

    argv = ["generate", "smollm2-135m-instruct", "Capital of France?", "--system", "Be brief."]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == "Paris.\n"
    assert calls == [
        (
            ("smollm2-135m-instruct", "Capital of France?"),
            {
                "chat": True,
                "system": "Be brief.",
                "max_new_tokens": 64,
                "temperature": 0.0,
                "top_p": 1.0,
                "seed": 0,
                "dtype": "float32",
            },
        )
    ]
