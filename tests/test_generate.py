"""`workbench generate`: the compressed model's continuation (and the dense one's), as transformers'
`generate` gives it; decoding options checked; model output shown literally."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import workbench
from conftest import tiny_profile
from workbench.cli import _show_continuations, app
from workbench.export.generation import Decoding, continuation
from workbench.profile.schema import parse_profile
from workbench.run.pipeline import run

runner = CliRunner()
PROMPT = "the cat runs"


@pytest.fixture(scope="module")
def run_dir(tiny_workspace):
    out = tiny_workspace / "runs" / "generate"
    if not out.exists():
        run(parse_profile(tiny_profile(tiny_workspace, out, ratio=0.3)))
    return out


def _direct(model, tokenizer, max_new_tokens=12, **options):
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id, **options)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_greedy_output_equals_a_direct_generate_call(run_dir):
    result = runner.invoke(app, ["generate", str(run_dir), PROMPT, "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    model = workbench.load_compressed(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    expected = _direct(model, tokenizer, do_sample=False)
    assert expected.strip()
    assert result.stdout.strip() == (PROMPT + expected).strip()


def test_dense_continuation_is_shown_after_the_compressed_one(run_dir, tiny_workspace):
    result = runner.invoke(app, ["generate", str(run_dir), PROMPT, "--max-new-tokens", "12", "--dense"])
    assert result.exit_code == 0, result.output
    dense = AutoModelForCausalLM.from_pretrained(tiny_workspace / "tiny-llama").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_workspace / "tiny-llama")
    compressed, dense_part = result.stdout.split("── dense (")
    assert compressed.startswith("── compressed (")
    assert (PROMPT + _direct(dense, tokenizer, do_sample=False)).strip() in dense_part


def test_sampling_is_repeatable_with_a_seed_and_differs_from_greedy(run_dir):
    model = workbench.load_compressed(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    sampled = Decoding(max_new_tokens=24, sample=True, temperature=1.5, top_p=1.0, seed=7)
    first = continuation(model, tokenizer, PROMPT, sampled)
    assert first == continuation(model, tokenizer, PROMPT, sampled)
    assert first != continuation(model, tokenizer, PROMPT, Decoding(max_new_tokens=24))
    torch.manual_seed(7)  # the same as transformers' own sampling from that seed
    assert first == _direct(model, tokenizer, 24, do_sample=True, temperature=1.5, top_p=1.0, top_k=None)


@pytest.mark.parametrize("options, words", [
    (["--temperature", "0", "--sample"], "--temperature"), (["--top-p", "1.5"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens")])
def test_bad_decoding_options_exit_2(run_dir, options, words):
    result = runner.invoke(app, ["generate", str(run_dir), PROMPT, *options])
    assert result.exit_code == 2 and words in result.output


def test_empty_prompt_and_missing_run_exit_2(run_dir, tmp_path):
    result = runner.invoke(app, ["generate", str(run_dir), "  "])
    assert result.exit_code == 2 and "prompt is empty" in result.output
    result = runner.invoke(app, ["generate", str(tmp_path / "nothing"), PROMPT])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.parametrize("terminal, width", [(False, 80), (True, 120), (True, 60)])
def test_model_output_is_shown_literally(terminal, width):
    console = Console(record=True, force_terminal=terminal, width=width, color_system=None)
    _show_continuations(console, "[bold]x", [("compressed", " [red]y[/red]"), ("dense", " z\\[/]")])
    text = console.export_text()
    assert "[bold]x" in text and "[red]y[/red]" in text and "z\\[/]" in text


def test_app_generate_panel_shows_both_continuations_literally(run_dir, tiny_workspace, tmp_path):
    import asyncio

    from textual.widgets import Checkbox, Input, Static, TabbedContent

    from workbench.tui.app import WorkbenchApp
    from workbench.tui.screens.run_detail import RunDetailScreen

    (tmp_path / "profiles").mkdir()
    app = WorkbenchApp(tmp_path / "profiles", run_dir.parent)
    prompt = "[bold]" + PROMPT  # typed text, shown as typed

    async def drive():
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("3")
            await pilot.pause()
            await pilot.press("enter")
            await pilot.pause()
            assert isinstance(app.screen, RunDetailScreen)
            app.screen.query_one(TabbedContent).active = "generate-tab"
            await pilot.pause()
            app.screen.query_one("#gen-dense", Checkbox).value = True
            field = app.screen.query_one("#gen-prompt", Input)
            field.value = prompt
            field.focus()
            await pilot.press("enter")
            for _ in range(1200):
                texts = [str(app.screen.query_one(f"#{i}", Static).content) for i in ("gen-compressed", "gen-dense-text")]
                if all(texts):
                    break
                await pilot.pause(0.05)
            await app.workers.wait_for_complete()
            return texts, str(app.screen.query_one("#gen-status", Static).content)

    texts, status = asyncio.run(drive())
    model = workbench.load_compressed(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    expected = continuation(model, tokenizer, prompt, Decoding())
    dense = AutoModelForCausalLM.from_pretrained(tiny_workspace / "tiny-llama").eval()
    assert texts == [prompt + expected, prompt + continuation(dense, tokenizer, prompt, Decoding())]
    assert status.startswith("greedy")
