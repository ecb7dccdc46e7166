"""Core subcommands: generate, chat, info.

Handlers import the modules they run (models, loaders, kernels) inside the function, so
`ipu-sparse --help` and argument errors stay fast; everything else is imported at the top.
"""
from __future__ import annotations

import argparse
import sys

from .config import DEFAULT_MODEL
from .errors import UserError
from .fileio import check_output_path

DTYPES = ("float32", "bfloat16", "float16")


def add_model_args(p: argparse.ArgumentParser, default: str = DEFAULT_MODEL) -> None:
    p.add_argument("--model", default=default,
                   help=f"preset name, .gguf file, Hugging Face directory or ipu-sparse checkpoint (default: {default})")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype of dense weights (default: float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    add_sampling_args(p, temperature=0.0)
    p.add_argument("--stats", action="store_true", help="print tokens/s to stderr")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (keeps the conversation; /reset, /quit)")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system message")
    add_sampling_args(p, temperature=0.0)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="show a model's config, parameter count and source")
    add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("export", help="write a (pruned) model as GGUF for llama.cpp, or as a Hugging Face directory")
    add_model_args(p)
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--gguf", metavar="FILE", help="GGUF file to write (llama architecture)")
    out.add_argument("--hf", metavar="DIR", help="Hugging Face directory to write (config.json + model.safetensors)")
    out.add_argument("--compressed-tensors", metavar="DIR",
                     help="compressed-tensors directory (sparse-bitmask: llm-compressor's format, loaded by vLLM)")
    p.add_argument("--f16", action="store_true",
                   help="store GGUF matrices as F16 (default F32); with --compressed-tensors, store values and "
                        "dense tensors as fp16 (default: the sparse layers' value dtype, bf16 for a dense model)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)


def load_for_cli(args):
    import torch

    from .loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"loading {args.model} ...", file=sys.stderr)
    lm = load_model(args.model, dtype=dtype, progress=True)
    if lm.tokenizer is None:
        raise UserError(f"{args.model}: no tokenizer found with the model")
    return lm


def check_text(text: str, what: str) -> str:
    """``text`` from the command line, refused if it holds bytes that are not UTF-8 (Python keeps
    them as lone surrogates, which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        ch = exc.object[exc.start]
        byte = f"byte 0x{ord(ch) - 0xdc00:02x}" if 0xdc80 <= ord(ch) <= 0xdcff else f"character {ch!r}"
        raise UserError(f"{what}: not valid UTF-8 ({byte} at position {exc.start})") from None
    return text


def decode_input(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def stdin_stream():
    """Standard input, or ``UserError`` when it is closed (``<&-``)."""
    if sys.stdin is None or sys.stdin.closed:
        raise UserError("standard input is closed")
    return sys.stdin


def read_stdin_text(what: str = "standard input") -> str:
    """All of standard input as UTF-8 text (one clear error for invalid bytes or a closed stream)."""
    stream = stdin_stream()
    try:
        data = stream.buffer.read() if hasattr(stream, "buffer") else stream.read()
    except OSError as exc:
        raise UserError(f"{what}: cannot read standard input ({exc.strerror or exc})") from None
    return decode_input(data, what) if isinstance(data, bytes) else check_text(data, what)


def _sampling(args):
    from .generate import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def cmd_generate(args) -> int:
    import time

    from .generate import TextStreamer, generate

    sampling = _sampling(args)
    prompt = read_stdin_text("--prompt -") if args.prompt == "-" else check_text(args.prompt, "--prompt")
    if args.system is not None:
        check_text(args.system, "--system")
    lm = load_for_cli(args)
    tok = lm.tokenizer
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = tok.encode(prompt)

    def write(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    streamer = TextStreamer(tok, write, skip_ids=tok.stop_ids)
    t0 = time.perf_counter()
    out = generate(lm.model, ids, args.max_new_tokens, sampling, tok.stop_ids, streamer)
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    if args.stats:
        print(f"[{len(ids)} prompt tokens, {len(out)} new tokens in {dt:.2f} s: {len(out) / max(dt, 1e-9):.1f} tok/s]",
              file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .generate import ChatSession

    sampling = _sampling(args)
    stream = stdin_stream()
    if args.system is not None:
        check_text(args.system, "--system")
    lm = load_for_cli(args)
    session = ChatSession(lm.model, lm.tokenizer, sampling, args.max_new_tokens, args.system)
    interactive = stream.isatty()
    raw = getattr(stream, "buffer", None)
    if interactive:
        print("chat with the model; /reset clears the history, /quit or Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("you> ")
            sys.stderr.flush()
        line = raw.readline() if raw is not None else stream.readline()
        if not line:
            break
        try:  # a line that is not UTF-8 is refused, the conversation goes on
            text = (decode_input(line, "input line") if isinstance(line, bytes) else check_text(line, "input line")).strip()
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if interactive:
            sys.stderr.write("model> ")
            sys.stderr.flush()
        try:
            session.ask(text, write=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


def cmd_info(args) -> int:
    import json

    lm = load_for_cli(args)
    cfg = lm.model.config
    n = sum(p.numel() for p in lm.model.parameters())
    print(json.dumps({"source": lm.source, "parameters": n, "config": cfg.to_dict(), "meta": lm.meta}, indent=1, default=str))
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    target = check_output_path(args.gguf or args.hf or args.compressed_tensors, args.overwrite,
                               directory=not args.gguf)
    lm = load_for_cli(args)
    model = lm.model
    if args.compressed_tensors:  # sparse layers are written as they are (bitmap = sparse-bitmask)
        from .loading.compressed_tensors import save_compressed_tensors

        save_compressed_tensors(model, lm.tokenizer, target, dtype="fp16" if args.f16 else None,
                                overwrite=args.overwrite)
        print(f"wrote {target}", file=sys.stderr)
        return 0
    if any(getattr(m, "is_sparse_linear", False) for _, m in model.linear_layers(include_head=True)):
        from .sparse.linear import densify_

        densify_(model)
    if args.gguf:
        from .loading.gguf_export import save_gguf

        save_gguf(model, lm.tokenizer, target, f16=args.f16)
    else:
        from .loading.hf import save_hf_dir

        save_hf_dir(model, lm.tokenizer, target, overwrite=args.overwrite)
    print(f"wrote {target}", file=sys.stderr)
    return 0
