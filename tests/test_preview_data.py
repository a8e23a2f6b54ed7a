"""``gguf-finetune preview-data``: what training sees, as text with [[trained]] spans and as JSON."""

from __future__ import annotations

import json

import pytest

from gguf_finetune.cli.main import main

CHAT = {"messages": [{"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello! How can I help?"},
                     {"role": "user", "content": "Say 42"}, {"role": "assistant", "content": "42 it is."}]}
MIXED = [CHAT,
         {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
                            {"from": "gpt", "value": "4"}]},
         {"prompt": "Q: capital of France?\nA:", "completion": " Paris"},
         {"text": "Just some text."}]


@pytest.fixture
def data(tmp_path, smollm2):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in MIXED))
    return p


def cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_plain_output_marks_exactly_the_trained_spans(data, capsys):
    code, out, err = cli(["preview-data", "--train-data", str(data), "-n", "0", "--no-color"], capsys)
    assert code == 0 and err == ""
    assert "[[Hello! How can I help?<|im_end|>]]\n<|im_start|>user\nSay 42<|im_end|>" in out
    assert "[[42 it is.<|im_end|>]]" in out
    assert "<|im_start|>assistant\n[[4<|im_end|>]]" in out  # ShareGPT record
    assert "A:[[ Paris<|im_end|>]]" in out  # completion + EOS
    assert "Just[[ some text.<|im_end|>]]" in out  # text: SmolLM2 adds no BOS, so the first token is context
    assert out.count("[[") == 5 + 1 and "(trained tokens are marked [[...]])" in out  # 5 spans + the legend
    assert "You are a helpful AI assistant named SmolLM" in out
    assert "--- record 2 (line 2, chat): " in out
    assert "4 records (chat 2, prompt/completion 1, text 1; chat template: the model's tokenizer.chat_template)" in out
    assert "0 records longer than 129 tokens" in out


def test_json_output_is_the_training_view(data, capsys, smollm2):
    from gguf_finetune.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2)
    code, out, err = cli(["preview-data", "-m", str(smollm2), "--train-data", str(data), "-n", "0", "--json"], capsys)
    assert code == 0
    objs = [json.loads(line) for line in out.splitlines()]
    recs = [o for o in objs if "row" not in o]  # one object per record, then one per row of the first batch
    rows = [o for o in objs if "row" in o]
    assert [r["line"] for r in recs] == [1, 2, 3, 4] and objs[:4] == recs
    packed = [(r["record"], r["line"]) for row in rows for r in row["records"]]
    assert sorted(packed) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # 4 short records fill the first batch's rows
    for r in recs[:2]:
        assert r["tokens"] == tok.tokenize(r["text"], special=True) and r["cut"] == 0
        assert len(r["trained"]) == len(r["tokens"]) and set(r["trained"]) == {0, 1}
    r = recs[0]
    trained = tok.detokenize([t for t, f in zip(r["tokens"], r["trained"]) if f], special=True)
    assert trained == "Hello! How can I help?<|im_end|>42 it is.<|im_end|>"
    assert r["text"].startswith("<|im_start|>system\n")
    assert recs[2]["tokens"][-1] == tok.eos_id and recs[2]["trained"][-1] == 1
    assert "4 records" in err  # the summary goes to stderr in JSON mode


def test_ctx_cuts_rows_and_says_so(data, capsys):
    code, out, _ = cli(["preview-data", "--train-data", str(data), "-n", "1", "--ctx", "20", "--json"], capsys)
    r = json.loads(out.splitlines()[0])  # the record; the first batch's rows follow
    assert len(r["tokens"]) == 21 and r["cut"] > 0 and sum(r["trained"]) == 0  # assistant text is beyond the row
    code, out, _ = cli(["preview-data", "--train-data", str(data), "-n", "1", "--ctx", "20", "--no-color"], capsys)
    assert "cut off by --ctx 20" in out and "more tokens not trained on" in out
    assert "2 records longer than 21 tokens (cut off)" in out


def test_train_on_prompt_and_template_override(data, capsys):
    code, out, _ = cli(["preview-data", "--train-data", str(data), "-n", "1", "--json", "--train-on-prompt"], capsys)
    r = json.loads(out.splitlines()[0])
    assert r["trained"] == [0] + [1] * (len(r["tokens"]) - 1)
    code, out, _ = cli(["preview-data", "--train-data", str(data), "-n", "1", "--chat-template", "llama2",
                        "--no-color"], capsys)
    assert "[INST] Hi there [/INST][[ Hello! How can I help? <|im_end|>]]" in out
    assert "chat template: built-in 'llama2'" in out


def test_color_highlighting(data, capsys):
    code, out, _ = cli(["preview-data", "--train-data", str(data), "-n", "1", "--color"], capsys)
    assert "\x1b[32;1mHello! How can I help?<|im_end|>\x1b[0m" in out and "[[" not in out


def test_plain_text_data(tmp_path, capsys, smollm2):
    p = tmp_path / "t.txt"
    p.write_text("<s>one two<s>three")
    code, out, _ = cli(["preview-data", "--train-data", str(p), "--sample-start", "<s>", "--no-color"], capsys)
    assert code == 0 and "--- record 2 (text sample)" in out and "[[three]]" in out


@pytest.mark.parametrize("content, extra, needle", [
    (b'{"text": "ok"}\n{"text": "x"\n', (), "train data '{p}': line 2, column"),
    (b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n', (),
     "line 3: invalid UTF-8 at byte 14 of the line (byte offset 29 in the file)"),
    (b'{"conversations": [{"from": "human", "value": "q"}]}\n', (), "line 1: the conversation has no assistant turn"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
     ("--chat-template", "EVIL"), "line 1: chat template (file '{t}') refused by the sandbox: access to attribute "
                                  "'__class__' of 'str' object is unsafe"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
     ("--chat-template", "chatmlx"), "--chat-template 'chatmlx': neither a built-in template"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
     ("--chat-template", "llama2"), "line 1: chat template (built-in 'llama2'): Conversation roles must alternate"),
])
def test_bad_input_is_one_line_exit_1(tmp_path, capsys, smollm2, content, extra, needle):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    t = tmp_path / "evil.jinja"
    t.write_text("{{ ''.__class__.__mro__ }}")
    extra = tuple(str(t) if x == "EVIL" else x for x in extra)
    if "llama2" in extra:  # two user turns in a row
        p.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "r"},
                                              {"role": "assistant", "content": "a"}]}))
    code, out, err = cli(["preview-data", "--train-data", str(p), *extra], capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("gguf-finetune preview-data: ")
    assert needle.format(p=p, t=t) in err


def test_usage(capsys, tmp_path):
    code, out, err = cli(["preview-data"], capsys)
    assert code == 1 and "--train-data" in err
    code, out, err = cli(["preview-data", "--train-data", str(tmp_path / "none.jsonl")], capsys)
    assert code == 1 and "not found" in err or "no such" in err.lower()
    code, out, err = cli(["preview-data", "--help"], capsys)
    assert code == 0 and "--train-on-prompt" in out
    code, out, err = cli(["--help"], capsys)
    assert "preview-data" in out
