"""Every mistake a user can make in ``chat`` and ``generate`` (issue 15): one line that says what to do,
the conversation kept, the exit status right. The pseudo-terminal test drives ``chat`` as a person does:
mistakes, Ctrl-C in the middle of a reply and at the prompt, Ctrl-D, and checks the state at the end
against a run that replays only the turns that completed."""

from __future__ import annotations

import io
import os
import re
import sys

import pytest
import torch
from _deps import require

import rwkv_zoo
from rwkv_zoo import cli
from rwkv_zoo.generation import generate
from rwkv_zoo.state import RWKVState, StateFileError, StateMismatchError
from rwkv_zoo.tokenizers import ByteTokenizer, TokenizerError, default_tokenizer

# Control characters a terminal would act on; \t, \n and the \r a pty adds before \n are fine.
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny, other_tiny):
    """A state file for each kind of mistake, next to a good one."""
    d = tmp_path_factory.mktemp("states")
    RWKVState.zeros(tiny, 1).save(d / "good.st")
    RWKVState.zeros(tiny, 2).save(d / "batch2.st")
    RWKVState.zeros(other_tiny, 1).save(d / "other.st")
    rwkv_zoo.save(tiny, d / "model.safetensors")
    torch.save(tiny.state_dict(), d / "model.pth")
    (d / "empty.st").write_bytes(b"")
    data = (d / "good.st").read_bytes()
    (d / "truncated.st").write_bytes(data[: len(data) // 2])
    (d / "adir").mkdir()
    return d


# (what the user types after /load-state or /save-state, a regex the one line must match)
LOAD_MISTAKES = {
    "checkpoint": ("model.safetensors", r"not an rwkv_zoo state file but a model checkpoint \(give it as the MODEL"),
    "pth": ("model.pth", r"not an rwkv_zoo state file but a PyTorch zip file"),
    "empty": ("empty.st", r"not an rwkv_zoo state file but empty"),
    "truncated": ("truncated.st", r"truncated or damaged"),
    "directory": ("adir", r"not an rwkv_zoo state file but a directory"),
    "missing": ("nothere.st", r"nothere.st does not exist"),
    "batch2": ("batch2.st", r"holds 2 sequences but chat needs a state of batch size 1"),
    "other-model": ("other.st", r"belongs to another model.*load it with that model"),
}
SAVE_MISTAKES = {
    "no-parent": ("nodir/x.st", r"cannot save the state to \S*nodir/x.st: the directory \S*nodir does not exist"),
    "directory": ("adir", r"cannot save the state to \S*adir: it is a directory"),
}


# ---------------------------------------------------------------------------------------------------
# RWKVState.save / load


@pytest.mark.parametrize("name", sorted(LOAD_MISTAKES))
def test_load_names_the_file_and_what_it_is(files, tiny, name):
    path, pattern = LOAD_MISTAKES[name]
    pattern = pattern.replace("but chat needs a state of batch size 1", r"\(batch size 2\) but 1 is needed")
    err = StateMismatchError if name in ("batch2", "other-model") else StateFileError
    with pytest.raises(err, match=pattern) as info:
        RWKVState.load(files / path, tiny, batch_size=1)
    assert "\n" not in str(info.value) and str(files / path) in str(info.value)


@pytest.mark.parametrize("name", sorted(SAVE_MISTAKES))
def test_save_names_the_users_path_never_the_temporary_file(files, tiny, name):
    path, pattern = SAVE_MISTAKES[name]
    before = sorted(os.listdir(files))
    with pytest.raises(StateFileError, match=pattern) as info:
        RWKVState.zeros(tiny, 1).save(files / path)
    assert ".tmp-" not in str(info.value) and sorted(os.listdir(files)) == before


# ---------------------------------------------------------------------------------------------------
# default tokenizers and demo presets


def test_default_tokenizer_by_vocabulary():
    assert isinstance(default_tokenizer(256), ByteTokenizer) and isinstance(default_tokenizer(1024), ByteTokenizer)
    assert default_tokenizer(65536).vocab_size == 65536
    with pytest.raises(TokenizerError, match="no default tokenizer fits a vocabulary of 100: pass token ids"):
        default_tokenizer(100)
    try:
        pile = default_tokenizer(50277)
    except TokenizerError as exc:  # no package here ships 20B_tokenizer.json: the message says what to pass
        assert "HFTokenizer(PATH)" in str(exc) and "--tokenizer PATH" in str(exc)
    else:
        assert pile.vocab_size >= 50277


def test_text_on_a_1024_id_test_model_samples_only_byte_ids():
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v7-small"), 0).eval()
    res = generate(model, "Once", max_new_tokens=40, seed=0)
    assert res.prompt_tokens == list(b"Once") and max(res.tokens) < 256 and isinstance(res.text, str)


def _run(monkeypatch, capsys, argv, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("version", [v for v in ("v4", "v5", "v6", "v7", "v7a", "v8") if v in rwkv_zoo.list_versions()])
def test_demo_presets_generate_and_chat(monkeypatch, capsys, version):
    rc, out, err = _run(monkeypatch, capsys, ["generate", f"{version}-small", "--prompt", "Hello", "--max-new-tokens",
                                              "8", "--seed", "0"])
    assert rc == 0, err
    rc, out, err = _run(monkeypatch, capsys, ["chat", f"{version}-tiny", "--max-new-tokens", "8"], "hi\n")
    assert rc == 0 and out.startswith("Assistant:"), err


def test_terminal_output_escapes_control_characters():
    from rwkv_zoo.cli.generate import _for_terminal

    assert _for_terminal("a\x1b[2Jb\r\x07\tc\nd\x7f\x85é") == "a\\x1b[2Jb\\r\\x07\tc\nd\\x7f\\x85é"


# ---------------------------------------------------------------------------------------------------
# one line per mistake, from the command line


@pytest.mark.parametrize("kind,name", [("load", n) for n in sorted(LOAD_MISTAKES)] +
                         [("save", n) for n in sorted(SAVE_MISTAKES)])
def test_chat_reports_each_mistake_in_one_line_and_goes_on(monkeypatch, capsys, files, kind, name):
    path, pattern = (LOAD_MISTAKES if kind == "load" else SAVE_MISTAKES)[name]
    flags = ["chat", "v7-tiny", "--temperature", "0", "--max-new-tokens", "4"]
    stdin = f"hello\n/{kind}-state {files / path}\nagain\n"
    rc, out, err = _run(monkeypatch, capsys, flags, stdin)
    assert rc == 0 and "Traceback" not in out + err, err
    lines = out.splitlines()
    bad = [line for line in lines if re.search(pattern, line)]
    assert len(bad) == 1 and bad[0].startswith("[") and bad[0].endswith("]"), out
    assert sum(line.startswith("Assistant:") for line in lines) == 2  # the turn after the mistake still ran


@pytest.mark.parametrize("flag,name", [("--load-state", n) for n in sorted(LOAD_MISTAKES)] +
                         [("--save-state", n) for n in sorted(SAVE_MISTAKES)])
def test_generate_reports_state_mistakes_in_one_line(monkeypatch, capsys, files, flag, name):
    path, pattern = (LOAD_MISTAKES if flag == "--load-state" else SAVE_MISTAKES)[name]
    pattern = pattern.replace("but chat needs a state of batch size 1", r"\(batch size 2\) but 1 is needed")
    rc, _out, err = _run(monkeypatch, capsys, ["generate", "v7-tiny", "--prompt", "hi", "--max-new-tokens", "2",
                                              flag, str(files / path)])
    assert rc == 2
    lines = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("rwkv-zoo generate: error: ") and re.search(pattern, lines[0]), err


def test_chat_help_lists_the_commands(monkeypatch, capsys):
    rc, out, _ = _run(monkeypatch, capsys, ["chat", "v7-tiny"], "/help\n/nonsense\n")
    assert rc == 0
    for cmd in ("/help", "/reset", "/save-state PATH", "/load-state PATH", "/quit"):
        assert cmd in out
    assert "[unknown command /nonsense" in out


# ---------------------------------------------------------------------------------------------------
# a person at a terminal

LONG = 1500  # tokens per reply: Ctrl-C lands long before the end; a whole reply still takes about a second
CHAT = [sys.executable, "-m", "rwkv_zoo", "chat", "v7-tiny", "--temperature", "0", "--max-new-tokens", str(LONG)]


def _spawn(argv, cwd):
    pexpect = require("pexpect")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RWKV_ZOO_NO_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1"}
    log = io.StringIO()
    child = pexpect.spawn(argv[0], argv[1:], cwd=str(cwd), env=env, encoding="utf-8", timeout=90,
                          dimensions=(50, 200))
    child.logfile_read = log
    return child, log


def _turn(child, line):
    child.sendline(line)
    child.expect_exact("User: ")


def test_chat_in_a_terminal_survives_every_mistake(files, tiny):
    child, log = _spawn(CHAT, files)
    child.expect_exact("User: ")
    _turn(child, "hello")
    _turn(child, "/help")
    for path, pattern in [*LOAD_MISTAKES.values()]:
        child.sendline(f"/load-state {path}")
        child.expect(pattern)
        child.expect_exact("User: ")
    for path, pattern in SAVE_MISTAKES.values():
        child.sendline(f"/save-state {path}")
        child.expect(pattern)
        child.expect_exact("User: ")
    child.sendline("tell me a long story")
    child.expect_exact("Assistant:")
    child.expect(r"\S")  # the reply has started
    child.sendintr()
    child.expect_exact("[reply stopped; the conversation goes on from before this turn]")
    child.expect_exact("User: ")
    child.sendintr()  # once at the prompt: a hint, not the end
    child.expect_exact("[press Ctrl-C again, Ctrl-D or type /quit to leave]")
    child.expect_exact("User: ")
    _turn(child, "and now?")
    _turn(child, "/save-state final.st")
    child.sendeof()
    child.expect(require("pexpect").EOF)
    child.close()
    transcript = log.getvalue()
    assert child.exitstatus == 0, transcript
    assert "Traceback" not in transcript and not RAW_CONTROL.search(transcript), transcript
    assert transcript.endswith("User: \r\n")  # Ctrl-D ended the prompt's line
    assert "[state saved to final.st]" in transcript

    # The state holds "hello" and "and now?" with their replies, and nothing of the stopped turn.
    kw = dict(tokenizer=ByteTokenizer(), max_new_tokens=LONG, temperature=0, stop=["\n\n"])
    state = None
    for line in ("hello", "and now?"):
        state = generate(tiny, f"User: {line}\n\nAssistant:", state=state, **kw).state
    saved = RWKVState.load(files / "final.st", tiny)
    for a, b in zip(saved.layers, state.layers, strict=True):
        for x, y in zip(a.tensors(), b.tensors(), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_two_ctrl_c_at_the_prompt_leave(tmp_path):
    child, log = _spawn(CHAT, tmp_path)
    child.expect_exact("User: ")
    child.sendintr()
    child.expect_exact("[press Ctrl-C again")
    child.expect_exact("User: ")
    child.sendintr()
    child.expect(require("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in log.getvalue(), log.getvalue()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream", [True, False])
def test_generate_escapes_control_characters_on_a_terminal_only(monkeypatch, capsys, stream):
    argv = ["generate", "v7-tiny", "--prompt", "Hello", "--max-new-tokens", "300", "--seed", "0"]
    argv += ["--stream"] if stream else []
    rc, piped, _ = _run(monkeypatch, capsys, argv)
    assert rc == 0 and RAW_CONTROL.search(piped)  # a pipe gets the text as generated
    terminal = _Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    assert cli.main(argv) == 0
    shown = terminal.getvalue()
    assert "\\x" in shown and not RAW_CONTROL.search(shown)
