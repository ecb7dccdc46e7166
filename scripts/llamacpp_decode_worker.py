"""llama.cpp side of scripts/bench_decode.py: runs in llama-cpp-python's own virtual environment.

Standard library + ``llama_cpp`` only (no torch, no ipu_sparse). Reads one JSON request per line
on stdin and answers one line ``@@{json}`` on stdout (anything else on stdout is llama.cpp's):

  {"cmd": "load", "name": N, "path": GGUF, "threads": T, "n_ctx": C}   -> {"ok", "version"}
  {"cmd": "run", "name": N, "prompt": [token ids], "n": K}            -> {"ok", "stamps", "tokens"}

``run`` decodes K tokens greedily (temperature 0, no repetition penalty, never stopping at EOS)
after the given token ids, time-stamping each token as it arrives. The prompt is evaluated one
token at a time (n_batch = n_ubatch = 1): llama-cpp-python 0.3.36 built here crashes (SIGSEGV in
llama_decode) on any batch of more than one token on this AMX-capable Xeon; decode steps are one
token anyway, and the benchmark does not time the prompt.
"""
import json
import sys
import time


def main() -> int:
    import llama_cpp

    models = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            if req["cmd"] == "load":
                models[req["name"]] = llama_cpp.Llama(
                    model_path=req["path"], n_ctx=req["n_ctx"], n_threads=req["threads"],
                    n_threads_batch=req["threads"], n_batch=1, n_ubatch=1, seed=0, verbose=False)
                reply = {"ok": True, "version": llama_cpp.__version__}
            elif req["cmd"] == "run":
                llm = models[req["name"]]
                llm.reset()
                stamps, tokens = [], []
                for tok in llm.generate(req["prompt"], top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                        repeat_penalty=1.0, reset=True):
                    stamps.append(time.perf_counter())
                    tokens.append(int(tok))
                    if len(tokens) >= req["n"]:
                        break
                reply = {"ok": True, "stamps": stamps, "tokens": tokens}
            else:
                reply = {"ok": False, "error": f"unknown command {req['cmd']!r}"}
        except Exception as exc:  # reported to the benchmark, which marks the row skipped
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write("@@" + json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
