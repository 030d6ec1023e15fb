"""`goldfinch-chat`: a terminal chat with a GoldFinch (or any OpenAI-compatible) server.

Replies stream token by token. The conversation is kept here and resent each turn (that is the
chat API), while a server session (`session_id`) keeps the model's state, so each turn only
prefills its new tokens; `--verbose` shows how many prompt tokens came from the session.

Commands: /reset (forget the conversation), /quit (or Ctrl-D). Ctrl-C during a reply stops it.
Input is read line by line from stdin, so it can be scripted:

    printf 'hello\\n/quit\\n' | goldfinch-chat --url http://127.0.0.1:8000
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from dataclasses import dataclass, field

import openai

from .client import GoldFinchClient, GoldFinchError, server_root

BUSY_RETRY_S = 5.0  # how long a turn waits for the server to finish aborting an interrupted reply
HELP = "commands: /reset (new conversation), /quit (or Ctrl-D); Ctrl-C stops a reply"


def sanitize(text: str) -> str:
    """Control characters (ESC, CR, ...) from a model could move the cursor or recolour the user's
    terminal; they are shown escaped instead (newline and tab stay)."""
    return "".join(c if c in "\n\t" or not (ord(c) < 32 or 127 <= ord(c) < 160) else f"\\x{ord(c):02x}"
                   for c in text)


@dataclass
class Conversation:
    """The messages resent every turn, and the server session that caches their state."""

    system: str | None
    session_id: str | None = None
    messages: list[dict] = field(default_factory=list)

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []


@dataclass
class TurnResult:
    text: str
    interrupted: bool
    usage: object | None  # openai's CompletionUsage, when the server sent one
    seconds: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="goldfinch-chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("GOLDFINCH_URL", "http://127.0.0.1:8000"),
                    help="server URL, with or without /v1 [env GOLDFINCH_URL]")
    ap.add_argument("--api-key", default=os.environ.get("GOLDFINCH_API_KEY"),
                    help="API key [env GOLDFINCH_API_KEY]")
    ap.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    ap.add_argument("--system", default=None, help="system prompt")
    ap.add_argument("--temperature", type=float, default=None, help="sampling temperature (server default)")
    ap.add_argument("--max-tokens", type=int, default=None, help="longest reply in tokens (server default)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server per request")
    ap.add_argument("--no-session", action="store_true", help="do not open a server session")
    ap.add_argument("--verbose", "-v", action="store_true", help="show token counts and speed after each reply")
    return ap.parse_args(argv)


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def open_session(client: GoldFinchClient) -> str | None:
    """A random id: two chats on one key never share state. A server without sessions (not
    GoldFinch) still chats, just without the cache."""
    try:
        return client.create_session(f"chat-{secrets.token_hex(8)}")["id"]
    except GoldFinchError as exc:
        err(f"[no server session: {exc.message}; every turn prefills the whole conversation]")
        return None


def close_session(client: GoldFinchClient, session_id: str | None) -> None:
    if session_id is None:
        return
    deadline = time.monotonic() + BUSY_RETRY_S
    while True:
        try:
            client.close_session(session_id)
            return
        except GoldFinchError as exc:
            if exc.status != 409 or time.monotonic() > deadline:  # 409: an aborted reply still winding down
                err(f"[could not close session {session_id}: {exc.message}]")
                return
            time.sleep(0.1)


def stream_reply(api: openai.OpenAI, args: argparse.Namespace, model: str, conv: Conversation) -> TurnResult:
    """Streams one reply to stdout. Ctrl-C closes the stream (the server aborts the request and the
    session keeps the state of what was generated), and the partial reply is kept."""
    extra = {"session_id": conv.session_id} if conv.session_id else {}
    kwargs = {k: v for k, v in (("temperature", args.temperature), ("max_tokens", args.max_tokens)) if v is not None}
    start, deadline = time.monotonic(), time.monotonic() + BUSY_RETRY_S
    parts: list[str] = []
    usage, interrupted, stream = None, False, None
    try:
        while stream is None:
            try:
                stream = api.chat.completions.create(model=model, messages=conv.messages, stream=True,
                                                     stream_options={"include_usage": True}, extra_body=extra,
                                                     **kwargs)
            except openai.ConflictError:  # the session is still busy with the request Ctrl-C just aborted
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    parts.append(choice.delta.content)
                    sys.stdout.write(sanitize(choice.delta.content))
                    sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if stream is not None:
            stream.close()
    sys.stdout.write("\n" + ("[interrupted]\n" if interrupted else ""))
    sys.stdout.flush()
    return TurnResult("".join(parts), interrupted, usage, time.monotonic() - start)


def report(result: TurnResult) -> None:
    u = result.usage
    if u is None:  # a stopped stream never reaches the usage chunk
        err(f"[{'stopped after ' if result.interrupted else ''}{result.seconds:.2f}s; no usage from the server]")
        return
    details = getattr(u, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) or 0
    speed = u.completion_tokens / result.seconds if result.seconds > 0 else 0.0
    err(f"[prompt_tokens={u.prompt_tokens} cached_tokens={cached} completion_tokens={u.completion_tokens} "
        f"time={result.seconds:.2f}s speed={speed:.1f} tok/s]")


def read_line(interactive: bool) -> str | None:
    """The next user line; None at end of input. Ctrl-C at the prompt only clears the line."""
    while True:
        try:
            return input("you> " if interactive else "")
        except EOFError:
            return None
        except KeyboardInterrupt:
            sys.stdout.write("\n")


def chat_loop(api: openai.OpenAI, client: GoldFinchClient, args: argparse.Namespace, model: str,
              conv: Conversation) -> None:
    interactive = sys.stdin.isatty()
    if interactive:
        err(f"model {model}; {HELP}")
    while (line := read_line(interactive)) is not None:
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            return
        if text == "/reset":
            close_session(client, conv.session_id)
            conv.session_id = None if args.no_session else open_session(client)
            conv.reset()
            print("[conversation reset]", flush=True)
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            print(HELP, flush=True)
            continue
        conv.messages.append({"role": "user", "content": line})
        if interactive:
            sys.stdout.write("assistant> ")
        try:
            result = stream_reply(api, args, model, conv)
        except openai.APIError as exc:
            conv.messages.pop()  # the turn did not happen: the next one must not resend it
            err(f"[error: {getattr(exc, 'status_code', '') or ''} {exc.message}]")
            continue
        if result.interrupted and not result.text:
            conv.messages.pop()  # stopped before any text: as if the line had not been sent
            continue
        # a partial (interrupted) reply is kept: it is what the model said, and what the session holds
        conv.messages.append({"role": "assistant", "content": result.text})
        if args.verbose:
            report(result)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a reply must never crash the chat on a narrow locale
    client = GoldFinchClient(args.url, args.api_key, timeout=args.timeout)
    api = openai.OpenAI(base_url=server_root(args.url) + "/v1", api_key=args.api_key or "EMPTY",
                        timeout=args.timeout, max_retries=0)
    conv = Conversation(system=args.system)
    conv.reset()
    try:
        model = args.model or client.models()[0]["id"]
        if not args.no_session:
            conv.session_id = open_session(client)
        chat_loop(api, client, args, model, conv)
        return 0
    except (GoldFinchError, openai.APIError, IndexError) as exc:
        err(f"goldfinch-chat: {exc if not isinstance(exc, IndexError) else 'the server lists no models'}")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        close_session(client, conv.session_id)
        client.close()
        api.close()


if __name__ == "__main__":
    sys.exit(main())
