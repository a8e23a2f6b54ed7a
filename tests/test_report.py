"""What a training run shows: llama.cpp's stdout lines (shapes as in the fixture's run2.log), the
tqdm bar on a terminal only."""

from __future__ import annotations

import os
import re
import select
import shlex
import subprocess
import sys

from gguf_finetune.cli.finetune import run
from tiny import TEXT

# the lines llama.cpp's finetune prints that we print too (run2.log also has input_size, compute_size,
# evaluation order and work_size, which describe ggml's buffers, and the model loader's lines)
PREFIXES = ("main: seed:", "main: model base", "main: init model", "print_params:", "print_lora_params:",
            "main: total train_iterations", "main: seen train_samples", "main: seen train_tokens",
            "main: completed train_epochs", "main: lora_size", "main: opt_size", "main: opt iter",
            "main: tokenize training data", "tokenize_file: total number of samples",
            "main: number of training tokens", "main: number of unique tokens", "main: begin training",
            "train_opt_callback: iter=", "save_checkpoint_lora_file:", "save_as_llama_lora:",
            "main: total training time")
ITER = re.compile(r"^train_opt_callback: iter=([ \d]{6}) sample=(\d+)/(\d+) sched=(\d+\.\d{6}) loss=(\d+\.\d{6})"
                  r"(?: dt=(\S+) eta=(\S+))? \|(-*)>$")
DURATION = r"(?:\d+d )?\d\d:\d\d:\d\d|\d+\.\dms"  # llama.cpp's print_duration


def shape(line: str) -> str:
    """A log line with its numbers, durations, file names and bar length masked."""
    line = re.sub(r"(saving to|data from) \S+$", r"\1 FILE", line)
    line = re.sub(r"= '[^']*'$", "= 'FILE'", line)
    line = re.sub(r"\|-*>$", "|BAR>", line)
    line = re.sub(DURATION, "DUR", line)
    line = re.sub(r"iter= *\d+", "iter=N", line)
    return re.sub(r"\d+(\.\d+)?", "N", line)


def kept(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(PREFIXES)]


def argv_like_fixture(testdata, iters: int) -> list[str]:
    """The fixture's command (commands.txt) on the synthetic model: same flags, files and save rhythm."""
    argv = shlex.split((testdata / "fixtures" / "llamacpp-tiny" / "commands.txt").read_text().splitlines()[0])[1:]
    assert argv[argv.index("--sample-start") + 1] == "\\n" and "--escape" in argv
    argv[argv.index("--model-base") + 1] = "m.gguf"
    argv[argv.index("--ctx") + 1] = "16"
    argv[argv.index("--adam-iter") + 1] = str(iters)
    return argv


def test_stdout_lines_have_llamacpps_shapes(testdata, work, capsys):
    """Run 1 (4 iterations) and run 2 (resumed, 6 more, saving every 2) as in commands.txt: run 2's
    lines are run2.log's lines, number for number, in the same order, once numbers, durations, file
    names and bar lengths are masked; then the masked parts themselves are checked."""
    (work / "train.txt").write_text(TEXT.replace("<s>", ""))  # samples start after '\n', as in the fixture
    assert run(argv_like_fixture(testdata, 4)) == 0
    capsys.readouterr()
    assert run(argv_like_fixture(testdata, 6)) == 0
    out = capsys.readouterr().out
    ref = (testdata / "fixtures" / "llamacpp-tiny" / "run2.log").read_text()
    assert [shape(ln) for ln in kept(out)] == [shape(ln) for ln in kept(ref)]

    # the numbers of the start-up lines: the checkpoint of run 1 (4 updates of 2 samples of 16 tokens)
    for line in ("main: total train_iterations 4", "main: seen train_samples     8",
                 "main: seen train_tokens      128", "main: completed train_epochs 0", "main: opt iter 4",
                 "main: seed: 7", "print_params: n_ctx                 : 16",
                 "print_lora_params: n_rank_wq             : 4"):
        assert line in out.splitlines(), line
    # the iteration lines: %6d iterations, sample A/B, the schedule, dt/eta from the second line on,
    # eta = 0 on the last one, and a bar 1 + 10·(first loss - loss) long
    rows = [ITER.match(ln) for ln in kept(out) if ln.startswith("train_opt_callback: iter=")]
    assert all(rows)
    assert [int(m.group(1)) for m in rows] == list(range(4, 11))
    assert [m.group(6) is None for m in rows] == [True] + [False] * 6
    assert rows[-1].group(7) == "0.0ms"
    first = float(rows[1].group(5))
    for m in rows[1:]:
        assert len(m.group(8)) == max(0, int(1 + (first - float(m.group(5))) * 10 + 0.5))
    assert kept(out)[-1].startswith("main: total training time: ")
    saves = [ln for ln in out.splitlines() if ln.startswith("save_")]
    assert saves[:4] == ["save_checkpoint_lora_file: saving to chk-tiny-6.gguf",
                         "save_checkpoint_lora_file: saving to chk-tiny-LATEST.gguf",
                         "save_as_llama_lora: saving to lora-tiny-6.bin",
                         "save_as_llama_lora: saving to lora-tiny-LATEST.bin"]


FLAGS = ["--model-base", "m.gguf", "--train-data", "train.txt", "--sample-start", "<s>", "--ctx", "16", "--batch",
         "2", "--seed", "3", "--threads", "1", "--lora-r", "2", "--adam-iter", "6", "--save-every", "0",
         "--checkpoint-out", "chk-ITERATION.gguf", "--lora-out", "lora-ITERATION.gguf"]
CMD = [sys.executable, "-c", "from gguf_finetune.cli.finetune import main; main()"]
BAR = re.compile(r"finetune:\s+\d+%\|[^|]*\| (\d+)/6 \[\d\d:\d\d<(\d\d:\d\d|\?), [^\]]*loss=\d+\.\d+, "
                 r"tok/s=\d+\.\d\]")


def _run_with_stderr_on_pty(cwd) -> tuple[int, str, str]:
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    p = subprocess.Popen(CMD + FLAGS, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    err = b""
    try:
        while True:  # read the terminal while the run goes on (its buffer is small)
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                err += chunk
            elif p.poll() is not None:
                break
        out = p.stdout.read().decode()
        p.wait(timeout=120)
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
    return p.returncode, out, err.decode(errors="replace")


def test_progress_bar_on_a_terminal(work):
    code, out, err = _run_with_stderr_on_pty(work)
    assert code == 0, err
    bars = BAR.findall(err)
    assert bars, err[-2000:]
    assert ("6", "00:00") in bars  # the last update: 6/6 iterations, nothing left
    assert "train_opt_callback: iter=     6" in out  # the llama.cpp lines still go to stdout


def test_no_progress_bar_on_a_pipe(work):
    p = subprocess.run(CMD + FLAGS, cwd=work, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert not BAR.search(p.stderr) and "it/s" not in p.stderr and "%|" not in p.stderr
    assert "train_opt_callback: iter=     6" in p.stdout
