#!/usr/bin/env python3
"""The PyTorch peer of a training step: transformers + PEFT LoRA on the same GGUF, on the CPU.

Runs in its own venv, never in gguf-finetune's environment; the benchmark starts it as a child
process and reads the ONE JSON object it prints on stdout (everything else goes to stderr):

    python3 -m venv /work/venv-peers && . /work/venv-peers/bin/activate
    pip install torch==2.13.0            # the exact CPU build; a bare `torch` may pull a CUDA build
    pip install torch==2.13.0 transformers peft gguf numpy sentencepiece

    python scripts/peers_torch.py --model M.gguf --mode text --ctx 256 --batch 1 --steps 5 --warmup 1 \\
        --threads 2 [--checkpointing] --rank 4 --targets q,k,v,o,gate,up,down
    python scripts/peers_torch.py --model M.gguf --mode chat --data examples/chat/train.jsonl --batch 8 --steps 5

transformers dequantizes the GGUF to float32 (``from_pretrained(dir, gguf_file=name)``); LoRA
(r = alpha = --rank, dropout 0) on the mapped projections, AdamW lr 1e-3, everything fp32.  A timed
step is forward + backward + optimizer step + zero_grad, each step on a new batch; the first
--warmup steps are not timed into the median.

text mode: seeded random windows of exactly --ctx tokens from --text (default: README.md and
docs/*.md), labels = inputs (transformers shifts them): tokens/s = batch * ctx / median step.
chat mode: JSONL records {"messages": [{"role", "content"}, ...]} in a seeded shuffled order,
rendered with the tokenizer's chat template (or --chat-template; Gemma 3's GGUF has none, so
``--chat-template gemma``), trained tokens = each assistant
turn's content and the template's end of turn (without trailing whitespace), the rest -100 (as
gguf-finetune marks them); a batch of --batch records padded on the right to its longest record (as
DataCollatorForSeq2Seq pads), records cut at --ctx tokens.  Reports trained tokens/s (labels != -100)
and positions/s (batch * padded length), each the median of the steps' rates (``*_total``: summed
over the timed steps), and the padding fraction.

Threads: torch.set_num_threads(--threads); OMP_WAIT_POLICY=PASSIVE unless --omp-wait-policy says
otherwise, as gguf-finetune sets it for its own OpenMP threads.  With libgomp's default spinning, two
threads on two cores that other work also wants ran SmolLM2's step 10-20x slower (40-85 s instead of
~4 s), since each waits spinning for a partner that is not running.  The JSON records the load
average before and after, and each step's process CPU seconds next to its wall seconds.

When a step cannot run (an architecture transformers cannot read from GGUF, a missing chat
template, ...) the JSON holds "error" and the stage it failed in, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
           "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

# Measured on the 2-core host (see the commit that added this script): sdpa was faster than eager
# for SmolLM2 and Gemma 3 270M training steps at ctx 256.
DEFAULT_ATTN = "sdpa"

# Used with --chat-template NAME when the GGUF has no tokenizer.chat_template (Gemma 3's GGUF has
# none): gguf-finetune's own built-in templates, so both sides render the same text.  The module
# needs only the standard library, so it imports in the peers' environment too.
sys.path.insert(0, str(REPO / "src"))
from gguf_finetune.data.chat_template import BUILTIN_TEMPLATES  # noqa: E402


class StageError(Exception):
    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--mode", choices=("text", "chat"), default="text")
    ap.add_argument("--ctx", type=int, default=256, help="text: window length; chat: longest record kept")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (non-reentrant)")
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank)")
    ap.add_argument("--targets", default="q,k,v,o,gate,up,down", help=f"comma list of {','.join(TARGETS)}")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--attn", choices=("sdpa", "eager"), default=DEFAULT_ATTN, help="attention implementation")
    ap.add_argument("--text", action="append", default=None, help="text file(s) for text mode")
    ap.add_argument("--data", default=str(REPO / "examples" / "chat" / "train.jsonl"), help="JSONL for chat mode")
    ap.add_argument("--chat-template", default=None,
                    help=f"chat mode: a template file or one of {', '.join(BUILTIN_TEMPLATES)}, "
                         "instead of the tokenizer's own (the GGUF's tokenizer.chat_template)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-flops", action="store_true", help="leave out the matmul FLOP count")
    ap.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"), default="passive",
                    help="OMP_WAIT_POLICY for torch's OpenMP threads (set before torch loads; 'inherit' keeps "
                         "the environment's). passive, as gguf-finetune sets for itself: with libgomp's "
                         "default spinning, 2 threads on 2 busy cores ran a step ~10x slower")
    ap.add_argument("--progress", action="store_true", help="keep transformers' progress bars (stderr)")
    a = ap.parse_args(argv)
    for name in ("ctx", "batch", "steps", "threads", "rank"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if a.warmup < 0:
        ap.error("--warmup must be >= 0")
    bad = [t for t in a.targets.split(",") if t.strip() not in TARGETS]
    if bad:
        ap.error(f"--targets: unknown {bad}; known: {','.join(TARGETS)}")
    return a


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def vm_hwm_mb() -> float | None:
    """VmHWM (peak RSS since the last reset_peak_rss) from /proc, None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the training steps' peak can be read apart
    from the loading peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def text_windows(tok, files: list[Path], ctx: int, batch: int, n_steps: int, seed: int):
    """n_steps batches of [batch, ctx] token windows at seeded random offsets in the tokenized text."""
    import numpy as np
    import torch

    text = "\n\n".join(p.read_text(encoding="utf-8") for p in files)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n_text = len(ids)
    if n_text == 0:
        raise StageError("data", "the text files hold no tokens")
    while len(ids) < ctx + 1:  # a short text: repeat it
        ids = ids + ids
    ids = np.asarray(ids, dtype=np.int64)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_steps):
        starts = rng.integers(0, len(ids) - ctx + 1, size=batch)
        x = torch.from_numpy(np.stack([ids[s:s + ctx] for s in starts]))
        out.append({"input_ids": x, "labels": x.clone()})
    return out, n_text


def load_template(tok, spec: str | None) -> str:
    if spec is not None:
        if spec in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[spec]
        p = Path(spec)
        if p.is_file():
            return p.read_text(encoding="utf-8")
        raise StageError("data", f"--chat-template {spec!r}: neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) "
                                 "nor a file")
    if getattr(tok, "chat_template", None):
        return tok.chat_template
    raise StageError("data", "the tokenizer transformers read from the GGUF has no chat template (the GGUF has no "
                             "tokenizer.chat_template): give --chat-template NAME|FILE")


def _render(tok, template: str, messages, add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)


def encode_chat(tok, template: str, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation: labels are the ids on the assistant turns' tokens and -100
    elsewhere.  Turn i spans from the end of render(messages[:i], generation prompt) to the end of
    render(messages[:i+1]) in the full rendering, trailing whitespace left out; a token overlapping
    the span counts as the turn's."""
    full = _render(tok, template, messages, False)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    trained = [False] * len(ids)
    search_from = 0
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        prompt = _render(tok, template, messages[:i], True)
        upto = _render(tok, template, messages[:i + 1], False)
        content = str(msg.get("content", "")).strip()
        if full.startswith(prompt) and full.startswith(upto) and len(upto) > len(prompt):
            a, b = len(prompt), len(upto)
        else:  # a template that renders a turn differently in context: the content as found
            a = full.find(content, search_from)
            if a < 0:
                raise StageError("data", f"cannot find assistant message {i} in the rendered conversation")
            b = a + len(content)
        while b > a and full[b - 1].isspace():
            b -= 1
        for t, (s, e) in enumerate(offsets):
            if e > a and s < b:
                trained[t] = True
        search_from = b
    labels = [x if m else -100 for x, m in zip(ids, trained)]
    if labels:
        labels[0] = -100  # the first token is never predicted
    return ids, labels


def chat_batches(tok, template: str, data: Path, ctx: int, batch: int, n_steps: int, seed: int):
    """n_steps batches of `batch` records (seeded shuffle, reshuffled each epoch), each padded on the
    right to its longest record; plus counts for the report."""
    import numpy as np
    import torch

    records = []
    with open(data, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line)["messages"])
    if not records:
        raise StageError("data", f"{data}: no records")
    encoded, truncated = [], 0
    for msgs in records:
        ids, labels = encode_chat(tok, template, msgs)
        if len(ids) > ctx:
            ids, labels, truncated = ids[:ctx], labels[:ctx], truncated + 1
        encoded.append((ids, labels))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rng = np.random.default_rng(seed)
    order: list[int] = []
    out = []
    for _ in range(n_steps):
        take = []
        while len(take) < batch:
            if not order:
                order = list(rng.permutation(len(encoded)))
            take.append(order.pop(0))
        rows = [encoded[j] for j in take]
        T = max(len(r[0]) for r in rows)
        x = torch.full((batch, T), pad_id, dtype=torch.long)
        y = torch.full((batch, T), -100, dtype=torch.long)
        m = torch.zeros((batch, T), dtype=torch.long)
        for r, (ids, labels) in enumerate(rows):
            x[r, :len(ids)] = torch.tensor(ids)
            y[r, :len(ids)] = torch.tensor(labels)
            m[r, :len(ids)] = 1
        out.append({"input_ids": x, "attention_mask": m, "labels": y})
    trained_total = sum(sum(1 for v in lab if v != -100) for _, lab in encoded)
    stats = {"records": len(records), "records_truncated": truncated,
             "record_tokens_mean": round(sum(len(i) for i, _ in encoded) / len(encoded), 1),
             "trained_tokens_per_record_mean": round(trained_total / len(encoded), 1)}
    return out, stats


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------
def step_matmul_flops(model_cfg, linears: dict[str, tuple[int, int]], lora_shapes: list[tuple[int, int]],
                      rank: int, B: int, T: int, checkpointing: bool) -> dict[str, float]:
    """Matmul FLOPs of one step, counted as scripts/bench.py counts them: the frozen projections
    need dx only, the LoRA matrices forward, dx and their gradients; attention QK^T and PV over the
    causal half of the square; the output head forward and dx.  transformers' checkpointing
    recomputes every decoder layer's forward (``recompute``)."""
    N = B * T
    cfg = model_cfg.get_text_config() if hasattr(model_cfg, "get_text_config") else model_cfg
    n_layer, n_head = cfg.num_hidden_layers, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    proj = sum(i * o for name, (i, o) in linears.items() if name != "lm_head")  # all layers
    head = linears.get("lm_head", (cfg.hidden_size, cfg.vocab_size))
    head_f = 2 * N * head[0] * head[1]
    attn = n_layer * 2 * 2 * B * n_head * T * T * head_dim / 2
    lora_f = sum(2 * N * rank * (i + o) for i, o in lora_shapes)
    fwd = 2 * N * proj + attn + head_f + lora_f
    bwd = 2 * N * proj + 2 * attn + head_f + 2 * lora_f
    recompute = (2 * N * proj + attn + lora_f) if checkpointing else 0.0
    return {"forward": fwd, "backward": bwd, "recompute": recompute, "total": fwd + bwd + recompute}


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def run(a: argparse.Namespace, res: dict) -> None:
    stage = "import"
    res["stage"] = stage
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    import peft
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res.update(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
               python=platform.python_version(), torch_threads=torch.get_num_threads())
    if not a.progress:
        transformers.utils.logging.disable_progress_bar()

    path = Path(a.model).resolve()
    if not path.is_file():
        raise StageError("load", f"{path}: no such file")
    res["stage"] = "load_tokenizer"
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    res["stage"] = "load_model"
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation=a.attn)
    res["load_seconds"] = round(time.perf_counter() - t0, 2)
    res["architecture"] = type(model).__name__
    res["attn_implementation"] = model.config._attn_implementation
    res["n_params"] = sum(p.numel() for p in model.parameters())

    res["stage"] = "data"
    n_batches = a.warmup + a.steps
    if a.mode == "text":
        files = [Path(p) for p in a.text] if a.text else [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
        batches, n_text = text_windows(tok, files, a.ctx, a.batch, n_batches, a.seed)
        res["text_files"] = [str(p) for p in files]
        res["text_tokens"] = n_text
    else:
        template = load_template(tok, a.chat_template)
        batches, stats = chat_batches(tok, template, Path(a.data), a.ctx, a.batch, n_batches, a.seed)
        res["data"] = str(Path(a.data).resolve())
        res["chat_template"] = a.chat_template or "tokenizer's (GGUF)"
        res.update(stats)

    res["stage"] = "lora"
    linears = {name: (m.in_features, m.out_features)
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [TARGETS[t.strip()] for t in a.targets.split(",")]
    lora_shapes = [v for k, v in linears.items() if k.rsplit(".", 1)[-1] in targets]
    model.config.use_cache = False
    if a.checkpointing:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        model.enable_input_require_grads()
    cfg = peft.LoraConfig(r=a.rank, lora_alpha=a.rank, lora_dropout=0.0, target_modules=targets, bias="none",
                          task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    res["trainable_params"] = sum(p.numel() for p in trainable)
    res["lora_matrices"] = len(lora_shapes)
    opt = torch.optim.AdamW(trainable, lr=a.lr)

    res["stage"] = "train"
    gc.collect()
    res["load_peak_rss_mb"] = round(rss_mb())  # loading (dequantization) and data, before the reset below
    res["peak_rss_reset"] = reset_peak_rss()
    losses, times, cpu = [], [], []
    for b in batches:
        c0, t0 = time.process_time(), time.perf_counter()
        out = model(**b)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(float(out.loss.detach()))
        del out
        print(f"step {len(times)}: {times[-1]:.3f}s loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    w = a.warmup
    step_s, med = times[w:], float(np.median(times[w:]))
    res.update(warmup_step_seconds=[round(t, 4) for t in times[:w]], step_seconds=[round(t, 4) for t in step_s],
               median_step_s=round(med, 4), step_cpu_seconds=[round(t, 3) for t in cpu[w:]],
               warmup_losses=[round(x, 4) for x in losses[:w]],
               losses=[round(x, 4) for x in losses[w:]])
    timed = batches[w:]
    if a.mode == "text":
        res["tokens_per_s"] = round(a.batch * a.ctx / med, 2)
    else:
        trained = [int((b["labels"][:, 1:] != -100).sum()) for b in timed]
        positions = [int(b["input_ids"].numel()) for b in timed]
        real = [int(b["attention_mask"].sum()) for b in timed]
        res.update(trained_tokens_per_step=trained, positions_per_step=positions,
                   trained_tokens_per_s=round(float(np.median([n / t for n, t in zip(trained, step_s)])), 2),
                   positions_per_s=round(float(np.median([n / t for n, t in zip(positions, step_s)])), 2),
                   trained_tokens_per_s_total=round(sum(trained) / sum(step_s), 2),
                   positions_per_s_total=round(sum(positions) / sum(step_s), 2),
                   padding_fraction=round(1 - sum(real) / sum(positions), 4))
    # the process's peak, loading included (as scripts/bench.py reports it); the reset also lowers
    # getrusage's maxrss, hence the max with the peak read before it
    res["peak_rss_mb"] = max(res["load_peak_rss_mb"], round(rss_mb()))
    hwm = vm_hwm_mb()
    if res["peak_rss_reset"] and hwm is not None:
        res["train_peak_rss_mb"] = round(hwm)  # the steps' own peak
    if not a.no_flops:
        fl = [step_matmul_flops(model.config, linears, lora_shapes, a.rank, *b["input_ids"].shape, a.checkpointing)
              for b in timed]
        res["matmul_flops_per_step"] = {k: float(np.median([f[k] for f in fl])) for k in fl[0]}
        res["matmul_gflops_per_s"] = round(float(np.median([f["total"] / t for f, t in zip(fl, step_s)])) / 1e9, 2)
    res.pop("stage")


def main(argv=None) -> int:
    a = parse_args(argv)
    if not a.progress:
        os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion bar
    if a.omp_wait_policy != "inherit":
        os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy.upper()  # read when torch loads libgomp
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on the network
    res: dict = {"model": Path(a.model).name, "model_path": str(Path(a.model).resolve()), "mode": a.mode,
                 "ctx": a.ctx, "batch": a.batch, "threads": a.threads, "checkpointing": a.checkpointing,
                 "attn_implementation": a.attn, "rank": a.rank, "targets": a.targets, "lr": a.lr,
                 "steps": a.steps, "warmup": a.warmup, "seed": a.seed,
                 "env": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                    "GOMP_SPINCOUNT", "KMP_BLOCKTIME") if k in os.environ},
                 "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    real_stdout = sys.stdout
    status = 0
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON object only
        try:
            run(a, res)
        except Exception as e:  # noqa: BLE001  (reported in the JSON, the caller decides)
            traceback.print_exc(file=sys.stderr)
            res["error"] = f"{type(e).__name__}: {e}".strip()[:2000]
            res["stage"] = getattr(e, "stage", res.get("stage"))
            status = 1
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    real_stdout.write(json.dumps(res) + "\n")
    real_stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
