"""finetune chat MODEL [--system TEXT] [--max-new-tokens N] [decoding flags]

Talk to a model in the terminal: each answer is streamed as it is generated, the conversation is kept
(rendered with the model's chat template), and these commands are understood:

    /reset          forget the conversation (the system prompt stays)
    /system TEXT    set the system prompt (keeps the conversation); `/system` alone goes back to the default
    /exit           leave (so do Ctrl-D and, at the prompt, Ctrl-C; Ctrl-C while answering stops the answer)

When stdin is not a terminal, its lines are read one by one: each non-empty line is a new user turn in the
same conversation (commands work too), echoed after `you> ` and answered after `assistant> `; at the end
of the input the command exits 0. For example: printf 'hello\\n/reset\\nhi\\n' | finetune chat runs/demo

MODEL is `embedded:smollm2-135m`, a run directory (base + its adapter), a local HF model folder or a hub
id. A model without a chat template is prompted with a plain "User: ... / Assistant:" transcript.
"""

from __future__ import annotations

import argparse
import sys

from finetune.generate import PROMPT_STYLES, add_decoding_arguments, add_model_arguments, decoding_settings

COMMANDS = "/reset, /system TEXT, /exit (or Ctrl-D)"


class ChatSession:
    """A conversation with one loaded model: history, system prompt, context trimming."""

    def __init__(self, loaded, system: str | None = None, settings: dict | None = None):
        self.loaded = loaded
        self.system = system
        self.settings = dict(settings or {})
        self.history: list[dict] = []
        self.turns = 0
        if loaded.prompt_style != "chat":
            loaded.prompt_style = "raw"  # the transcript below is the whole prompt

    def reset(self) -> None:
        self.history = []

    def prompt(self, history: list[dict]):
        system = [{"role": "system", "content": self.system}] if self.system else []
        if self.loaded.prompt_style == "chat":
            return system + history
        names = {"system": "System", "user": "User", "assistant": "Assistant"}
        lines = [f"{names[m['role']]}: {m['content']}" for m in system + history]
        return "\n".join(lines) + "\nAssistant:"

    def _fit(self, history: list[dict]) -> list[dict]:
        """Drop the oldest exchanges while the prompt plus the answer would not fit the model's context."""
        from finetune.generate import encode_prompt

        limit = getattr(self.loaded.model.config, "max_position_embeddings", None)
        budget = self.settings.get("max_new_tokens", 256)
        while limit and len(history) > 1 and len(encode_prompt(self.loaded, self.prompt(history))) + budget > limit:
            history = history[2:]
        return history

    def reply(self, text: str, streamer=None) -> dict:
        """Answer one user turn (streamed to `streamer` when given) and keep it in the history."""
        from finetune.generate import generate

        history = self._fit([*self.history, {"role": "user", "content": text}])
        settings = {**self.settings, "seed": self.settings.get("seed", 0) + self.turns}
        settings.pop("batch_size", None)
        out = generate(self.loaded, [self.prompt(history)], streamer=streamer, **settings)[0]
        self.history = [*history, {"role": "assistant", "content": out["text"]}]
        self.turns += 1
        return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model", metavar="MODEL",
                        help="embedded:smollm2-135m, a run directory, a model folder or a hub id")
    parser.add_argument("--system", default=None, metavar="TEXT", help="system prompt (default: the template's own)")
    parser.add_argument("--prompt-style", default=None, choices=PROMPT_STYLES,
                        help="chat (default when the tokenizer has a chat template) or a plain transcript (raw)")
    add_model_arguments(parser)
    add_decoding_arguments(parser, max_new_tokens=256, batch=False)


def _lines(interactive: bool):
    """User lines: from the terminal (with line editing) or from piped stdin."""
    if interactive:
        try:
            import readline  # noqa: F401  (arrow keys and history for input())
        except ImportError:
            pass
        while True:
            try:
                yield input("you> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return
    else:
        for line in sys.stdin:
            line = line.rstrip("\n")
            if line.strip():
                print(f"you> {line}", flush=True)
            yield line


def run(args) -> None:
    """The verb, with library chatter quieted and put back as it was on return."""
    from finetune.generate import quiet_libraries

    with quiet_libraries():
        _run(args)


def _run(args) -> None:
    from transformers import TextStreamer

    from finetune.generate import apply_threads, check_decoding, load_for_inference

    apply_threads(args)
    check_decoding(**decoding_settings(args))
    interactive = sys.stdin.isatty()
    loaded = load_for_inference(args.model, dtype=args.dtype, prompt_style=args.prompt_style,
                                trust_remote_code=args.trust_remote_code)
    session = ChatSession(loaded, args.system, decoding_settings(args))
    print(f"{loaded.description}\nCommands: {COMMANDS}", flush=True)
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    for line in _lines(interactive):
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                print("(conversation reset)", flush=True)
            elif command == "/system":
                session.system = rest.strip() or None
                print(f"(system prompt {'set' if session.system else 'back to the default'})", flush=True)
            else:
                print(f"(unknown command {command}; commands: {COMMANDS})", flush=True)
            continue
        print("assistant> ", end="", flush=True)
        try:
            out = session.reply(text, streamer=streamer)  # the streamer prints the answer and a newline
        except KeyboardInterrupt:
            if not interactive:
                raise
            print("\n(answer interrupted; that turn is forgotten)", flush=True)
            continue
        if not out["stopped"]:
            print(f"(cut at --max-new-tokens {args.max_new_tokens})", flush=True)
