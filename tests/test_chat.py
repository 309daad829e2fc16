"""`finetune chat`: piped prompts, commands, multi-turn history (tiny model, real torch)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_chat_answers_piped_prompts_and_exits_cleanly(tiny_llama):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", "chat", str(tiny_llama), "--max-new-tokens", "8", "--dtype", "fp32"],
        input="hello\n/reset\nhi\n/exit\nnever read\n", capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    out = proc.stdout
    assert out.count("assistant> ") == 2 and "(conversation reset)" in out
    assert "you> hello" in out and "you> hi" in out and "never read" not in out
    assert "(cut at --max-new-tokens 8)" in out  # a random model does not stop by itself


def test_history_is_kept_until_reset(tiny_llama):
    from finetune.chat import ChatSession
    from finetune.generate import encode_prompt, load_for_inference, release

    loaded = load_for_inference(str(tiny_llama), dtype="fp32")
    try:
        session = ChatSession(loaded, system="Be brief.", settings={"max_new_tokens": 4})
        first = session.reply("hello")
        session.reply("and again")
        assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
        assert session.history[1]["content"] == first["text"]
        rendered = loaded.tokenizer.decode(encode_prompt(loaded, session.prompt(session.history)))
        assert "Be brief." in rendered and "hello" in rendered and "and again" in rendered
        session.reset()
        assert session.history == [] and session.system == "Be brief."
    finally:
        release(loaded)
