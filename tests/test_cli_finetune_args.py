"""Command-line parsing (cli/parser.py) of llama.cpp's finetune / export-lora flags (cli/finetune_args.py,
cli/export_lora.py): names, defaults, errors, exit codes."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from gguf_finetune.cli.export_lora import export_lora_parser, parse_export_lora_args
from gguf_finetune.cli.finetune_args import (
    FinetuneArgs,
    LoraArgs,
    finetune_parser,
    parse_finetune_args,
    process_escapes,
)
from gguf_finetune.cli.parser import MAX_CTX, HelpRequested, get_path
from gguf_finetune.errors import UsageError

METAVARS = {"N", "F", "FNAME", "STR", "SEED", "S"}


def ref_lines(testdata, name: str) -> list[tuple[list[str], str]]:
    """(option names, line) for every option line of a reference --help text."""
    out = []
    for line in (testdata / "reference" / name).read_text().splitlines():
        if not line.lstrip().startswith("-"):
            continue
        names = []
        for w in line.split():
            w = w.rstrip(",")
            if w.startswith("-"):
                names.append(w)
            elif w not in METAVARS:
                break
        out.append((names, line))
    return out


def ref_default(line: str) -> str | None:
    """The text of '(default X)' / '(default: X, ...)' in a reference line, quotes removed."""
    m = re.search(r"\(default(?::\s*|\s+)([^)]*)\)", line)
    if not m:
        return None
    return m.group(1).split(",")[0].strip().strip("'")


def help_of(parser) -> str:
    with pytest.raises(HelpRequested) as e:
        parser.parse(["--help"])
    return e.value.text


def has_token(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


# -- every reference option is offered, with its default ------------------------------------------
@pytest.mark.parametrize("ref, parser", [("llama-finetune-help.txt", finetune_parser),
                                         ("llama-export-lora-help.txt", export_lora_parser)])
def test_every_reference_option_is_in_help(testdata, ref, parser):
    p = parser()
    text = help_of(p)
    lines = ref_lines(testdata, ref)
    assert len(lines) >= 5
    for names, _ in lines:
        assert names, _
        for n in names:
            assert has_token(text, n), f"{n} missing from our --help"
            if n not in ("-h", "--help"):
                p.find(n)  # and parsed (KeyError if not)


# our deliberate differences: llama.cpp printed a fixed number but used the model's value unless given
MODEL_VALUE = {"--norm-rms-eps", "--rope-freq-base", "--rope-freq-scale"}


def effective_default(args: FinetuneArgs, o) -> object:
    """The value a flag's default resolves to (ranks and alpha follow --lora-r when not given)."""
    if o.dest.startswith("lora.rank_"):
        return args.lora.resolved_ranks()[o.dest[len("lora.rank_"):]]
    if o.dest == "lora.lora_alpha":
        return args.lora.alpha
    return get_path(args, o.dest)


@pytest.mark.parametrize("ref, parser", [("llama-finetune-help.txt", finetune_parser),
                                         ("llama-export-lora-help.txt", export_lora_parser)])
def test_reference_defaults(testdata, ref, parser):
    p = parser()
    defaults = p.parse([])
    checked = 0
    for names, line in ref_lines(testdata, ref):
        if names == ["-h", "--help"]:
            continue
        o = p.find(names[-1])
        if o.flag in MODEL_VALUE:
            assert get_path(defaults, o.dest) is None
            assert "the model's value" in p.default_text(o)
            continue
        value = effective_default(defaults, o)
        if "(default)" in line:  # a flag that is on by default in llama.cpp
            assert value == o.const, o.flag
            checked += 1
            continue
        text = ref_default(line)
        if text is None:
            continue
        if isinstance(value, bool):
            assert value == (text == "on"), o.flag
        elif isinstance(value, float):
            assert value == pytest.approx(float(text), abs=6e-7), o.flag
        elif isinstance(value, int):
            assert value == int(text), o.flag
        else:
            assert value == text, o.flag
        checked += 1
    assert checked >= (40 if "finetune" in ref else 2)


def test_norm_ranks_default_to_zero_unlike_llamacpp():
    """Deliberate: llama.cpp's finetune used rank 1 for norms; today's llama.cpp ignores norm adapters."""
    args = parse_finetune_args([])
    ranks = args.lora.resolved_ranks()
    assert {k: ranks[k] for k in ("att_norm", "ffn_norm", "out_norm")} == {"att_norm": 0, "ffn_norm": 0, "out_norm": 0}
    assert all(v == 4 for k, v in ranks.items() if not k.endswith("norm"))
    text = help_of(finetune_parser())
    assert text.count("llama.cpp: 1") == 3
    args = parse_finetune_args(["--rank-att-norm", "1", "--rank-ffn-norm", "1", "--rank-out-norm", "1"])
    assert all(args.lora.resolved_ranks()[k] == 1 for k in ("att_norm", "ffn_norm", "out_norm"))


def test_defaults_match_the_engine():
    """The flags fill the engine's own settings, and their rank defaults are the LoRA layer's."""
    from gguf_finetune.config import AdamWConfig, TrainConfig
    from gguf_finetune.lora import LoraRanks

    assert FinetuneArgs().train == TrainConfig() and FinetuneArgs().train.adam == AdamWConfig()
    assert LoraRanks(**LoraArgs().resolved_ranks()) == LoraRanks()


# -- every spelling of every option reaches its field ----------------------------------------------
def _sample(o) -> tuple[list[str], object]:
    """A valid raw value list for option o and the value it should store."""
    raws = []
    for conv in o.convert:
        for cand in ("3", "0.5", "f16", "gguf", "x.txt"):
            try:
                conv(cand)
                raws.append(cand)
                break
            except ValueError:
                pass
    vals = [c(r) for c, r in zip(o.convert, raws)]
    return raws, (o.make(*vals) if o.make else vals[0] if len(vals) == 1 else tuple(vals))


@pytest.mark.parametrize("parser", [finetune_parser, export_lora_parser])
def test_every_spelling_parses(parser):
    p = parser()
    for o in p.options:
        raws, expected = _sample(o) if o.takes_value else ([], o.const)
        for name in o.names + o.aliases:
            spellings = [name] + ([name.replace("-", "_").replace("__", "--", 1)] if name.startswith("--") else [])
            for s in spellings:
                got = get_path(p.parse([s, *raws]), o.dest)
                assert got == ((expected,) if o.append else expected), (s, raws)


def test_finetune_values():
    a = parse_finetune_args(shlex.split(
        "--model-base m.gguf -c 64 -t 2 -b 4 -s 7 --grad-acc 3 --lora-r 8 --rank-ffn_gate 2 --rank-wq=6 "
        "--adam-alpha 0.02 --adam-iter 0 --no-separate-with-bos --separate-with-eos --enable-restart "
        "--no-flash --no-checkpointing -ngl 99 --lora-format ggla --lora-type BF16 --memory-budget 1.5G "
        "--no-progress --epochs 2 --ctx 32"))
    assert a.model.model_base == "m.gguf"
    assert (a.train.n_ctx, a.run.n_threads, a.train.n_batch, a.run.seed, a.train.grad_acc) == (32, 2, 4, 7, 3)  # last --ctx wins
    assert a.lora.resolved_ranks() == dict(tok_embd=8, out_norm=0, out=8, att_norm=0, wq=6, wk=8, wv=8, wqkv=8,
                                           wo=8, ffn_norm=0, ffn_gate=2, ffn_down=8, ffn_up=8)
    assert a.lora.alpha == 8.0  # llama.cpp: alpha defaults to r
    assert (a.train.adam.alpha, a.train.adam.n_iter, a.train.adam.enable_restart, a.train.epochs) == (0.02, 0, True, 2)
    assert (a.data.separate_with_bos, a.data.separate_with_eos) == (False, True)
    assert (a.train.flash, a.train.checkpointing, a.run.n_gpu_layers) == (False, False, 99)
    assert (a.out.lora_format, a.out.lora_type) == ("ggla", "bf16")
    assert a.run.memory_budget == int(1.5 * 2**30) and a.run.progress is False
    assert a.is_given("-c") and a.is_given("--ctx") and a.is_given("-b") and a.is_given("--n-gpu-layers")
    assert not a.is_given("--warmup") and not a.is_given("--use-flash")


def test_size_flags_accept_their_upper_bounds():
    a = parse_finetune_args(shlex.split(f"--ctx {MAX_CTX} -b {MAX_CTX} --lora-r {MAX_CTX} --rank-wq 0"))
    assert (a.train.n_ctx, a.train.n_batch, a.lora.lora_r, a.lora.rank_wq) == (MAX_CTX, MAX_CTX, MAX_CTX, 0)
    with pytest.raises(UsageError, match=r"^--ctx: expected an integer in \[1, 1048576\], got '2000000'$"):
        parse_finetune_args(["--ctx", "2000000"])


def test_underscore_spellings_as_llamacpp():
    # llama.cpp rewrites '_' to '-' in --long flags; its own help spells three flags with '_'
    for spelling in ("--rank-ffn_gate", "--rank-ffn-gate", "--rank_ffn_gate"):
        assert parse_finetune_args([spelling, "5"]).lora.rank_ffn_gate == 5
    assert parse_finetune_args(["--train_data", "t.txt"]).data.train_data == "t.txt"


def test_restart_flags_take_no_value():
    assert parse_finetune_args(["--enable-restart"]).train.adam.enable_restart is True
    assert parse_finetune_args(["--enable-restart", "--disable-restart"]).train.adam.enable_restart is False
    with pytest.raises(UsageError, match="'5'.*--enable-restart takes no value"):
        parse_finetune_args(["--enable-restart", "5"])


def test_alpha_scaling_and_optional_values():
    a = parse_finetune_args(["--lora-r", "16", "--lora-alpha", "32"])
    assert a.lora.alpha == 32.0
    assert parse_finetune_args(["--lora-alpha", "0.5"]).lora.alpha == 0.5
    a = parse_finetune_args(["--rope-freq-base", "32000", "--norm-rms-eps", "1e-6"])
    assert (a.model.rope_freq_base, a.model.norm_rms_eps, a.model.rope_freq_scale) == (32000.0, 1e-6, None)
    assert parse_finetune_args(["--seed", "-1"]).run.seed == -1
    assert parse_finetune_args(["--progress"]).run.progress is True
    assert parse_finetune_args([]).run.progress is None


@pytest.mark.parametrize("raw, expected", [("2G", 2 << 30), ("512M", 512 << 20), ("512MiB", 512 << 20),
                                           ("100", 100), ("1k", 1024), ("auto", None)])
def test_memory_budget(raw, expected):
    assert parse_finetune_args(["--memory-budget", raw]).run.memory_budget == expected


def test_metrics_path():
    assert parse_finetune_args([]).out.metrics_path == "metrics.jsonl"
    assert parse_finetune_args(["--checkpoint-out", "runs/chk-ITERATION.gguf"]).out.metrics_path == "runs/metrics.jsonl"
    assert parse_finetune_args(["--metrics-out", "m.jsonl"]).out.metrics_path == "m.jsonl"


@pytest.mark.parametrize("raw, expected", [
    (r"a\nb", b"a\nb"), (r"\t\r", b"\t\r"), (r"\'\"\\", b"'\"\\"), (r"\q", b"\\q"), ("end\\", b"end\\"),
    (r"\x41\x4a", b"AJ"), (r"\x4", b"\\x4"), (r"\xZZ", b"\\xZZ"), ("\u00e9\\n", "\u00e9\n".encode()),
])
def test_process_escapes(raw, expected):
    assert process_escapes(raw) == expected


def test_sample_start_escape():
    assert parse_finetune_args(["--sample-start", r"\n", "--escape"]).data.sample_start_bytes == b"\n"
    assert parse_finetune_args(["--sample-start", r"\n"]).data.sample_start_bytes == b"\\n"
    assert parse_finetune_args(["--sample-start", "-- "]).data.sample_start == "-- "  # a value is taken verbatim


def test_fixture_and_guide_command_lines(testdata):
    """The command lines of the llama.cpp fixture run and of the guides parse to what they say."""
    lines = (testdata / "fixtures" / "llamacpp-tiny" / "commands.txt").read_text().splitlines()
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "finetune"
        a = parse_finetune_args(argv[1:])
        assert (a.train.n_ctx, a.train.n_batch, a.run.n_threads, a.run.seed) == (32, 2, 2, 7)
        assert (a.train.adam.alpha, a.train.adam.warmup, a.train.save_every) == (0.02, 2, 2)
        assert a.data.sample_start_bytes == b"\n" and a.data.include_sample_start
        assert a.out.lora_out == "lora-tiny-ITERATION.bin" and a.out.checkpoint_in == "chk-tiny-LATEST.gguf"
    assert [parse_finetune_args(shlex.split(x)[1:]).train.adam.n_iter for x in lines] == [4, 6]
    a = parse_finetune_args(shlex.split(
        "--model-base llama-2-13b-chat.Q5_K_M.gguf --lora-out lora.bin --train-data train.txt "
        "--sample-start '<SFT>' --adam-iter 1024"))
    assert a.data.sample_start == "<SFT>" and a.train.adam.n_iter == 1024


def test_export_lora_values():
    a = parse_export_lora_args(shlex.split("-m base.gguf --lora a.gguf --lora-scaled b.gguf 0.5 --lora c.bin "
                                           "-o out.gguf -t 4 --outtype q8_0"))
    assert a.model == "base.gguf" and a.output == "out.gguf" and a.n_threads == 4 and a.outtype == "q8_0"
    assert a.adapters == (("a.gguf", 1.0), ("b.gguf", 0.5), ("c.bin", 1.0))
    old = parse_export_lora_args(shlex.split("--model-base X --lora Y --model-out Z"))
    assert (old.model, old.adapters, old.output, old.outtype) == ("X", (("Y", 1.0),), "Z", "f16")
    old = parse_export_lora_args(shlex.split("-m X -l Y -s W -1.5"))
    assert old.adapters == (("Y", 1.0), ("W", -1.5)) and old.output == "ggml-lora-merged-f16.gguf"


# -- errors: in-process and through the real console entries ---------------------------------------
FINETUNE_ERRORS = [
    ("--ctx 0", "--ctx"), ("-c 0", "--ctx"), ("--ctx", "--ctx"), ("--ctx abc", "--ctx"), ("--ctx 1.5", "--ctx"),
    ("--batch 0", "--batch"), ("--grad-acc 0", "--grad-acc"), ("-t 0", "--threads"),
    ("--adam-iter -1", "--adam-iter"), ("--adam-alpha 0", "--adam-alpha"), ("--adam-alpha nan", "--adam-alpha"),
    ("--adam-beta1 1", "--adam-beta1"), ("--adam-beta2 -0.1", "--adam-beta2"), ("--lora-alpha 0", "--lora-alpha"),
    ("--lora-r 0", "--lora-r"), ("--rank-wq -1", "--rank-wq"), ("--rank-ffn_gate -1", "--rank-ffn_gate"),
    ("--rank-att-norm -2", "--rank-att-norm"), ("--seed x", "--seed"), ("--bogus", "--bogus"),
    ("--enable-restart 5", "--enable-restart"), ("--memory-budget lots", "--memory-budget"),
    ("--lora-type q4_0", "--lora-type"), ("--escape=yes", "--escape"), ("--lora-out --ctx 4", "--lora-out"),
    ("--rope-freq-base 0", "--rope-freq-base"),
    # sizes with an upper bound (no allocation numpy would refuse, no late out-of-memory)
    ("--ctx 99999999999999999999", "--ctx"), ("--ctx 1048577", "--ctx"), ("-b 99999999999999999999", "--batch"),
    ("--lora-r 99999999999999999999", "--lora-r"), ("--lora-r 1048577", "--lora-r"),
    ("--rank-wq 99999999999999999999", "--rank-wq"), ("--rank-out-norm 1048577", "--rank-out-norm"),
    ("--grad-acc 99999999999999999999", "--grad-acc"), ("--opt-past 99999999999999999999", "--opt-past"),
]
EXPORT_ERRORS = [
    ("--lora a.gguf", "--model"), ("-m b.gguf", "--lora"), ("-m b.gguf --lora-scaled a.gguf x", "--lora-scaled"),
    ("-m b.gguf --lora-scaled a.gguf", "--lora-scaled"), ("-m b.gguf --lora a -t 0", "--threads"),
    ("-m b.gguf --lora a --outtype q2_k", "--outtype"), ("-m b.gguf --lora a --frobnicate", "--frobnicate"),
]


@pytest.mark.parametrize("cmd, flag", FINETUNE_ERRORS)
def test_finetune_usage_errors(cmd, flag):
    with pytest.raises(UsageError) as e:
        parse_finetune_args(shlex.split(cmd))
    msg = str(e.value)
    assert flag in msg and "\n" not in msg and e.value.exit_code == 2


@pytest.mark.parametrize("cmd, flag", EXPORT_ERRORS)
def test_export_lora_usage_errors(cmd, flag):
    with pytest.raises(UsageError) as e:
        parse_export_lora_args(shlex.split(cmd))
    assert flag in str(e.value)


def run_main_inprocess(main, argv, capsys) -> tuple[int, str, str]:
    """A console entry's main(argv) in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def check_one_line_error(code: int, out: str, err: str, want_code: int, prog: str, *needles: str) -> None:
    assert code == want_code, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and out == ""
    assert lines[0].startswith(prog + ": "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("cmd, flag", FINETUNE_ERRORS)
def test_finetune_errors_through_main(cmd, flag, capsys):
    from gguf_finetune.cli.main import main

    check_one_line_error(*run_main_inprocess(main, ["finetune", *shlex.split(cmd)], capsys), 2,
                         "gguf-finetune finetune", flag)


@pytest.mark.parametrize("cmd, flag", EXPORT_ERRORS)
def test_export_lora_errors_through_main(cmd, flag, capsys):
    from gguf_finetune.cli.export_lora import main

    check_one_line_error(*run_main_inprocess(main, shlex.split(cmd), capsys), 2, "export-lora", flag)


# -- the real console entries, in subprocesses (run concurrently once for the module) ---------------
PY_M = [sys.executable, "-m", "gguf_finetune"]


def _entry(target: str) -> list[str]:
    """A console script's main() exactly as the installed wrapper calls it."""
    module, func = target.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


FINETUNE = _entry("gguf_finetune.cli.finetune:main")
EXPORT_LORA = _entry("gguf_finetune.cli.export_lora:main")

# (command, exit status, stderr line prefix or None for success, text the output must contain)
CONSOLE_CASES = [
    *((PY_M + ["finetune", *shlex.split(c)], 2, "gguf-finetune finetune", f) for c, f in FINETUNE_ERRORS[::9]),
    (FINETUNE + ["--ctx", "0"], 2, "finetune", "--ctx"),
    *((EXPORT_LORA + shlex.split(c), 2, "export-lora", f) for c, f in EXPORT_ERRORS[:2]),
    (PY_M, 2, "gguf-finetune", "missing command"),
    (PY_M + ["inspec"], 2, "gguf-finetune", "did you mean inspect"),
    (PY_M + ["--help"], 0, None, "inspect"),
    (FINETUNE + ["-c", "64", "--help"], 0, None, "--rank-ffn_gate"),  # --help before anything is done
    (EXPORT_LORA + ["--help"], 0, None, "--model-base"),
]


@pytest.mark.parametrize("argv, needle", [
    (["--help"], "tokenize"), (["finetune", "--help"], "--rank-ffn_gate"), (["export-lora", "-h"], "--lora-scaled"),
    (["inspect", "--help"], "--json"), (["tokenize", "--help"], "--add-bos"), (["--version"], "gguf-finetune 0"),
])
def test_help_and_version_through_main(argv, needle, capsys):
    from gguf_finetune.cli.main import main

    code, out, err = run_main_inprocess(main, argv, capsys)
    assert code == 0 and err == "" and needle in out


@pytest.mark.parametrize("argv, needle", [([], "missing command"), (["frobnicate"], "unknown command"),
                                          (["--bogus"], "unknown option")])
def test_dispatch_errors_through_main(argv, needle, capsys):
    from gguf_finetune.cli.main import main

    check_one_line_error(*run_main_inprocess(main, argv, capsys), 2, "gguf-finetune", needle)


@pytest.fixture(scope="module")
def console_results():
    from concurrent.futures import ThreadPoolExecutor

    def run(cmd):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(max_workers=4) as ex:
        return list(ex.map(run, [c[0] for c in CONSOLE_CASES]))


@pytest.mark.parametrize("i", range(len(CONSOLE_CASES)),
                         ids=[" ".join(c[0][3 if c[0][1] == "-m" else 1:])[:60] for c in CONSOLE_CASES])
def test_console_entries(i, console_results):
    cmd, code, prog, needle = CONSOLE_CASES[i]
    r = console_results[i]
    if prog is None:
        assert r.returncode == code and r.stderr == "", (r.returncode, r.stderr)
        assert needle in r.stdout
    else:
        check_one_line_error(r.returncode, r.stdout, r.stderr, code, prog, needle)


# -- run_main and set_threads ---------------------------------------------------------------------------
def test_run_main_statuses(capsys):
    from gguf_finetune.cli.common import run_main
    from gguf_finetune.errors import UserError

    def raiser(exc):
        def fn(argv):
            raise exc
        return fn

    for fn, code, line in ((lambda a: None, 0, None), (lambda a: 3, 3, None),
                           (raiser(UserError("model 'x':\n  bad")), 1, "prog: model 'x': bad"),
                           (raiser(UsageError("--ctx: no")), 2, "prog: --ctx: no"),
                           (raiser(KeyboardInterrupt()), 130, "prog: interrupted")):
        with pytest.raises(SystemExit) as e:
            run_main(fn, [], "prog")
        err = capsys.readouterr().err
        assert e.value.code == code
        assert err.splitlines() == ([line] if line else [])
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_main(lambda a: 1 / 0, [], "prog")


def test_broken_stdout_pipe_exits_quietly():
    code = ("from gguf_finetune.cli.common import run_main\n"
            "def f(argv):\n"
            "    for _ in range(100000): print('x' * 100)\n"
            "run_main(f, [], 't')\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()  # the reader goes away, like `| head -c 10`
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141 and err == ""


def test_set_threads():
    import numba

    from gguf_finetune.cli.common import set_threads

    before = numba.get_num_threads()
    try:
        assert set_threads(1) == 1 and numba.get_num_threads() == 1
        cap = numba.config.NUMBA_NUM_THREADS
        assert set_threads(cap + 5) == cap and numba.get_num_threads() == cap
    finally:
        numba.set_num_threads(before)
    with pytest.raises(ValueError):
        set_threads(0)
    # before numpy is imported, BLAS is limited through the environment
    code = ("import os, sys; from gguf_finetune.cli.common import set_threads; n = set_threads(1); "
            "print(n, os.environ['OPENBLAS_NUM_THREADS'], os.environ['OMP_NUM_THREADS'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["1", "1", "1"], r.stderr



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS found through /proc/self/maps")
def test_set_threads_limits_blas_after_numpy_is_imported():
    """finetune imports numpy before it parses --threads: numpy's OpenBLAS is then told through its
    own setter (without it 2 MPI ranks x --threads 1 ran 2 BLAS threads each on 2 cores)."""
    code = ("import ctypes, os, numpy\n"
            "from gguf_finetune.cli import common\n"
            "libs = common.loaded_openblas()\n"
            "get = [getattr(l, s.replace('set', 'get')) for l in libs for s in common.OPENBLAS_SET_THREADS\n"
            "       if hasattr(l, s.replace('set', 'get'))]\n"
            "assert get, 'no OpenBLAS in numpy'\n"
            "common.set_threads(2); before = get[0]()\n"
            "common.set_threads(1); print(before, get[0]())\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    before, after = map(int, r.stdout.split())
    assert after == 1 and before == min(2, os.cpu_count() or 1)

_FAULTS_CODE = """
import resource, sys
import numpy as np
from gguf_finetune.cli.common import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None

def step():  # what a step without checkpointing does: allocate activations, free them at the end
    blocks = [np.ones((256, 1536), np.float32) for _ in range(40)]  # 40 x 1.5 MB
    del blocks

step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
                    reason="keep_freed_memory only changes glibc's malloc")
def test_keep_freed_memory_reuses_pages_between_steps():
    """Freed activations stay mapped for the next step: ~15,000 page faults (60 MB) become ~0."""
    runs = {}
    for mode in ("default", "keep"):
        r = subprocess.run([sys.executable, "-c", _FAULTS_CODE, mode], capture_output=True, text=True, timeout=60)
        kept, faults = r.stdout.split()
        runs[mode] = (kept, int(faults))
    assert runs["keep"][0] == "True"
    assert runs["default"][1] > 10_000  # glibc's defaults: the second step maps the 60 MB afresh
    assert runs["keep"][1] < 1_000, runs
