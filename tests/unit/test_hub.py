"""`lms get` from Hugging Face: what a name means and which file of a repo is taken (no network here; the
downloads themselves are tested against a fake Hub in tests/e2e/test_get_hf.py)."""

from __future__ import annotations

import pytest

from lmscli import hub
from lmscli.client import CliError
from lmscli.hub import HubFile, Target, choices_of, default_choice, parse_target, pick, quant_of


@pytest.mark.parametrize(("text", "target"), [
    ("bartowski/Qwen2.5-0.5B-Instruct-GGUF", Target("bartowski/Qwen2.5-0.5B-Instruct-GGUF")),
    ("owner/repo@q8_0", Target("owner/repo", quant="q8_0")),
    ("owner/repo/sub/model.Q4_K_M.gguf", Target("owner/repo", "sub/model.Q4_K_M.gguf")),
    ("https://huggingface.co/owner/repo/blob/main/model.gguf", Target("owner/repo", "model.gguf")),
    ("hf.co/owner/repo/", Target("owner/repo")),
])
def test_names_a_user_types(text: str, target: Target) -> None:
    assert parse_target(text) == target


@pytest.mark.parametrize(("text", "message"), [
    ("owner", "is not a Hugging Face repo: give OWNER/REPO"), ("owner/../x", "is not a Hugging Face repo"),
    ("ow ner/repo", "is not a Hugging Face repo"), ("owner/repo/model.safetensors", "is not a .gguf file"),
    ("owner/repo@fast", "after @ comes a quantization"), ("owner/repo/m.gguf@Q8_0", "name a file or a quantization"),
])
def test_names_that_cannot_be_a_gguf_on_the_hub_are_refused_saying_why(text: str, message: str) -> None:
    with pytest.raises(CliError) as exc:
        parse_target(text)
    assert message in exc.value.message


@pytest.mark.parametrize(("name", "quant"), [
    ("Qwen2.5-0.5B-Instruct-Q4_K_M.gguf", "Q4_K_M"), ("model.Q8_0.gguf", "Q8_0"), ("m-IQ4_XS.gguf", "IQ4_XS"),
    ("x-f16.gguf", "F16"), ("big-Q4_K_M-00001-of-00002.gguf", "Q4_K_M"), ("plain.gguf", ""),
])
def test_the_quantization_comes_from_the_file_name(name: str, quant: str) -> None:
    assert quant_of(name) == quant


def files(*names: str) -> list[HubFile]:
    return [HubFile(n, 100 * i, "") for i, n in enumerate(names, 1)]


def test_shards_are_one_choice_and_projectors_none() -> None:
    choices = choices_of(files("m-Q8_0.gguf", "mmproj-m-f16.gguf", "README.md", "m-Q4_K_M-00001-of-00002.gguf",
                               "m-Q4_K_M-00002-of-00002.gguf"))
    assert [(c.label, c.quant, [f.name for f in c.files]) for c in choices] == [
        ("m-Q8_0.gguf", "Q8_0", ["m-Q8_0.gguf"]),
        ("m-Q4_K_M.gguf", "Q4_K_M", ["m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf"]),
    ]
    assert choices[1].size == 400 + 500


def test_the_default_is_q4_k_m_else_the_closest_quantization() -> None:
    repo = files("m-Q8_0.gguf", "m-Q5_K_M.gguf", "m-Q3_K_L.gguf", "m-Q4_K_M.gguf", "m-F16.gguf")
    assert default_choice(choices_of(repo)).label == "m-Q4_K_M.gguf"
    without = [f for f in repo if "Q4_K_M" not in f.name]
    assert default_choice(choices_of(without)).label == "m-Q5_K_M.gguf"  # 5 bits before 3: quality first
    assert default_choice(choices_of(files("m-F16.gguf", "m-Q8_0.gguf"))).label == "m-Q8_0.gguf"


def test_a_named_quantization_or_file_that_is_not_there_lists_what_is() -> None:
    repo = files("m-Q8_0.gguf", "m-Q4_K_M.gguf")
    choices = choices_of(repo)
    assert pick(Target("o/r", quant="q8_0"), choices, repo, select=False).label == "m-Q8_0.gguf"
    with pytest.raises(CliError, match="no Q2_K file; it has: Q4_K_M, Q8_0"):
        pick(Target("o/r", quant="Q2_K"), choices, repo, select=False)
    with pytest.raises(CliError, match="no file x.gguf; its GGUF files: m-Q8_0.gguf, m-Q4_K_M.gguf"):
        pick(Target("o/r", "x.gguf"), choices, repo, select=False)


def test_a_download_the_disk_cannot_hold_is_refused_before_it_starts(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: object) -> None:
    monkeypatch.setattr(hub.Hub, "__init__",
                        lambda self: setattr(self, "endpoint", "x") or setattr(self, "commit", "c"))
    monkeypatch.setattr(hub.Hub, "files", lambda self, repo: [HubFile("m-Q4_K_M.gguf", 5 << 30, "ab" * 32)])
    monkeypatch.setattr(hub.Hub, "download", lambda *a: pytest.fail("nothing may be downloaded"))
    monkeypatch.setattr(hub, "_free_bytes", lambda path: 1 << 30)
    plan = hub.fetch("o/r", select=False, dry_run=True, models_dir=tmp_path)  # type: ignore[arg-type]
    assert plan["fits"] is False and plan["download_bytes"] == 5 << 30 and plan["free_bytes"] == 1 << 30
    with pytest.raises(CliError, match="needs 5.0 GB and .* has 1.0 GB free"):
        hub.fetch("o/r", select=False, dry_run=False, models_dir=tmp_path)  # type: ignore[arg-type]
