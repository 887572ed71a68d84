"""`lmforge chat`: a terminal conversation with a model; `lmforge generate --chat TEXT`: one turn of it.

Lines typed are user messages; the reply streams as it is generated.  Commands: ``/reset`` (forget the
history), ``/system TEXT`` (set the system prompt; ``/system`` alone clears it, the history starts afresh),
``/history`` (how many messages the history holds), ``/quit`` (or end of input).
"""

from __future__ import annotations

import json
import sys
from typing import IO

from lmforge.core.errors import LmforgeError
from lmforge.eval.chat_session import ChatSession
from lmforge.eval.sampling import GenerationConfig
from lmforge.recipes.evaluate import load_for_inference

HELP = "commands: /reset  /system TEXT  /history  /quit"


def generation_config(args) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop or [],
                            seed=args.seed)


def session(args) -> ChatSession:
    model, tokenizer = load_for_inference(args.model, args.device)
    if getattr(model, "is_encoder_decoder", False):
        raise LmforgeError(f"'{args.model}' is an encoder-decoder model; chat needs a decoder with a chat template")
    return ChatSession(model, tokenizer, generation_config(args), system=getattr(args, "system", None))


def one_turn(args) -> dict:
    """`generate --chat TEXT`: the reply to one user message, streamed unless --no-stream/--json."""
    chat = session(args)
    stream = None if args.no_stream or args.json else sys.stdout
    answer = chat.reply(args.chat, stream=stream)
    if stream is not None:
        sys.stdout.write("\n")
    elif args.json:
        print(json.dumps({"message": args.chat, "reply": answer}))
    else:
        print(answer)
    return {"message": args.chat, "reply": answer}


def run_chat(args, stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> int:
    chat = session(args)
    inp, out = stdin or sys.stdin, stdout or sys.stdout
    out.write(f"chatting with {args.model} ({HELP})\n")
    while True:
        out.write("you> ")
        out.flush()
        line = inp.readline()
        if not line:  # end of input
            out.write("\n")
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/quit", "/exit"):
            return 0
        if text.strip() == "/reset":
            chat.reset()
            out.write("(history cleared)\n")
            continue
        if text.strip() == "/history":
            out.write(f"(history: {len(chat.history)} messages)\n")
            continue
        if text.startswith("/system"):
            chat.system = text[len("/system"):].strip() or None
            chat.reset()
            out.write(f"(system prompt {'set' if chat.system else 'cleared'}; history cleared)\n")
            continue
        if text.startswith("/"):
            out.write(f"(unknown command {text.split()[0]}; {HELP})\n")
            continue
        out.write("assistant> ")
        out.flush()
        try:
            chat.reply(text, stream=out)
        except LmforgeError as e:  # a message too long for the context: say so, keep chatting
            out.write(f"error: {e}")
        out.write("\n")
