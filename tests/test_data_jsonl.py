"""JSONL records: parsing and errors, rendering + prompt masking, batches, resumable iteration."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gguf_finetune.data.batches import ShuffleState, resume_shuffle, shuffle_samples
from gguf_finetune.data.chat_template import BUILTIN_TEMPLATES, ChatTemplate, load_chat_template
from gguf_finetune.data.jsonl import (
    RecordBatchConfig,
    RecordBatchIterator,
    build_dataset,
    chat_mask,
    detect_format,
    encode_record,
    load_jsonl_dataset,
    mask_by_prefixes,
    record_batch,
    record_batch_ref,
    record_eval_batches,
)
from gguf_finetune.data.records import Record, parse_jsonl, read_jsonl
from gguf_finetune.errors import UserError

CHAT2 = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Say 42"}, {"role": "assistant", "content": "42 it is."}]


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------
def test_every_shape_and_mixed_file():
    lines = [
        {"messages": CHAT2},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                           {"from": "gpt", "value": "A"}]},
        {"prompt": "P", "completion": "C", "extra": 1},
        {"prompt": [{"role": "user", "content": "u"}], "completion": [{"role": "assistant", "content": "a"}]},
        {"text": "T"},
    ]
    data = ("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n   \n" + "\r\n".join(json.dumps(x) for x in lines[2:])
            + "\n").encode()
    recs = parse_jsonl(data, "f.jsonl")
    assert [r.kind for r in recs] == ["chat", "chat", "prompt_completion", "chat", "text"]
    assert [r.line for r in recs] == [1, 2, 5, 6, 7]
    assert [m["role"] for m in recs[1].messages] == ["system", "user", "assistant"]
    assert recs[1].messages[2]["content"] == "A"
    assert (recs[2].prompt, recs[2].completion) == ("P", "C")
    assert recs[3].train_from == 1 and len(recs[3].messages) == 2
    assert recs[4].text == "T"


def test_utf8_bom_and_unicode():
    recs = parse_jsonl(b"\xef\xbb\xbf" + json.dumps({"text": "caf\u00e9 \u2603"}, ensure_ascii=False).encode(), "f")
    assert recs[0].text == "caf\u00e9 \u2603"


@pytest.mark.parametrize("data, needle", [
    (b'{"text": "ok"}\n{"text": "a",}\n', "line 2, column"),
    (b'{"text": "ok"}\n[1, 2]\n', "line 2: expected a JSON object, got a list"),
    (b'{"foo": 1}\n', "line 1: no 'messages', 'conversations'"),
    (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', "line 2: invalid UTF-8 at byte 11 of the line (byte offset 25"),
    (b'{"messages": [{"role": "user", "content": "q"}]}\n', "line 1: the conversation has no assistant turn"),
    (b'\n{"conversations": [{"from": "human", "value": "q"}]}', "line 2: the conversation has no assistant turn"),
    (b'{"conversations": [{"from": "robot", "value": "q"}]}', "unknown 'from' value 'robot'"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "'content' must be a string, got a number"),
    (b'{"messages": [{"content": "x"}]}', "messages[0] has no 'role' string"),
    (b'{"messages": "hello"}', "'messages' must be a list of messages"),
    (b'{"prompt": "p"}', "has 'prompt' or 'completion' but no 'completion'"),
    (b'{"prompt": "p", "completion": ["x"]}', "must both be strings or both be lists"),
    (b'{"prompt": [{"role": "user", "content": "u"}], "completion": [{"role": "user", "content": "v"}]}',
     "the completion has no assistant turn"),
    (b'{"text": null}', "'text' must be a string, got null"),
])
def test_bad_lines_name_file_and_line(data, needle):
    with pytest.raises(UserError) as e:
        parse_jsonl(data, "data.jsonl")
    msg = str(e.value)
    assert msg.startswith("train data 'data.jsonl': line ")
    assert needle in msg
    assert "\n" not in msg


def test_read_jsonl_file_errors(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(UserError, match="no records"):
        read_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "v.jsonl").write_text("{]\n")
    with pytest.raises(UserError, match="^validation data '.*v.jsonl': line 1"):
        read_jsonl(tmp_path / "v.jsonl", "validation data")


def test_all_records_empty_is_an_error(tmp_path):
    """Every record without text trains on nothing but EOS tokens: refused as plain text of only
    whitespace is; one empty record among others is fine."""
    p = tmp_path / "e.jsonl"
    p.write_text('{"text": ""}\n{"text": "  "}\n{"prompt": "", "completion": " "}\n'
                 '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "\\n"}]}\n')
    with pytest.raises(UserError, match=r"^train data '.*e.jsonl': all 4 records are empty .* nothing to train on$"):
        read_jsonl(p)
    p.write_text('{"text": ""}\n{"text": "the cat"}\n')
    assert [r.text for r in read_jsonl(p)] == ["", "the cat"]


def test_detect_format():
    assert detect_format("a/b.JSONL") == "jsonl" and detect_format("x.ndjson") == "jsonl"
    assert detect_format("x.txt") == "text" and detect_format("x.json") == "text"
    assert detect_format("x.txt", "jsonl") == "jsonl" and detect_format("x.jsonl", "text") == "text"


# ------------------------------------------------------------------------------------------------
# masks on SmolLM2 (ChatML template in the GGUF)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smol(smollm2):
    from gguf_finetune.data.chat_template import GGUF_KEY
    from gguf_finetune.gguf_io import open_gguf
    from gguf_finetune.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2)
    tpl = load_chat_template(None, open_gguf(smollm2).get(GGUF_KEY), tok)
    return tok, tpl


def trained_runs(tok, ids, trained) -> list[str]:
    """The texts of the maximal runs of trained tokens."""
    runs, cur = [], []
    for t, f in zip(ids, trained):
        if f:
            cur.append(int(t))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.detokenize(r, special=True) for r in runs]


def test_two_turn_chat_trains_exactly_the_assistant_turns(smol):
    tok, tpl = smol
    e = encode_record(Record("chat", 1, tuple(CHAT2)), tok, tpl)
    assert "You are a helpful AI assistant named SmolLM" in e.text  # the GGUF's template added its system turn
    assert e.ids.tolist() == tok.tokenize(e.text, special=True)  # trained on = tokenization of the rendered text
    assert trained_runs(tok, e.ids, e.trained) == ["Hello! How can I help?<|im_end|>", "42 it is.<|im_end|>"]
    im_end = tok.tokenize("<|im_end|>", special=True)[0]
    ends = [i for i, t in enumerate(e.ids) if t == im_end]
    assert [int(e.trained[i]) for i in ends] == [0, 0, 1, 0, 1]  # system, user, assistant, user, assistant
    assert e.ids[-1] == tok.tokenize("\n")[0] and e.trained[-1] == 0  # the newline after the turn: not trained
    # prompt tokens (system, user turns, assistant headers) are all untrained
    untrained = tok.detokenize([t for t, f in zip(e.ids, e.trained) if not f], special=True)
    assert "Hi there" in untrained and "Say 42" in untrained and "Hello" not in untrained


def test_train_on_prompt_trains_everything_but_the_first_token(smol):
    tok, tpl = smol
    e = encode_record(Record("chat", 1, tuple(CHAT2)), tok, tpl, train_on_prompt=True)
    assert e.trained[0] == 0 and e.trained[1:].all()


def test_conversational_prompt_completion_trains_only_the_completion(smol):
    tok, tpl = smol
    recs = parse_jsonl(json.dumps({"prompt": CHAT2[:3], "completion": CHAT2[3:]}).encode(), "f")
    e = encode_record(recs[0], tok, tpl)
    assert trained_runs(tok, e.ids, e.trained) == ["42 it is.<|im_end|>"]


def test_prompt_completion_and_text_records(smol):
    tok, _ = smol
    e = encode_record(Record("prompt_completion", 1, prompt="Q: capital of France?\nA:", completion=" Paris"), tok,
                      None)
    assert e.ids[:-1].tolist() == tok.tokenize("Q: capital of France?\nA: Paris")
    assert e.ids[-1] == tok.eos_id
    assert trained_runs(tok, e.ids, e.trained) == [" Paris<|im_end|>"]
    e = encode_record(Record("text", 1, text="Just some text."), tok, None)
    assert e.ids.tolist() == tok.tokenize("Just some text.") + [tok.eos_id]
    assert e.trained.tolist() == [0] + [1] * (len(e.ids) - 1)  # no BOS for SmolLM2: the first token is context


def test_seam_token_counts_as_completion(smol):
    tok, _ = smol
    # "A: " + "42": the BPE token " 42" straddles the seam; it is what the model must produce
    e = encode_record(Record("prompt_completion", 1, prompt="A: ", completion="42"), tok, None)
    assert e.ids[:-1].tolist() == tok.tokenize("A: 42")
    assert "42" in trained_runs(tok, e.ids, e.trained)[0]


def test_chat_mask_agrees_with_character_spans(smol):
    """The token-prefix method (chat_mask) and character spans (mask_by_prefixes) give the same flags."""
    tok, tpl = smol
    msgs = [{"role": "system", "content": "Be brief."}] + CHAT2
    full = tpl.render(msgs)
    ids = tok.tokenize(full, special=True)
    fast = chat_mask(tpl, tok, msgs, full, ids)
    spans = []
    for m in msgs:
        if m["role"] == "assistant":
            a = full.index(m["content"])
            spans.append((a, a + len(m["content"]) + len("<|im_end|>")))
    np.testing.assert_array_equal(fast, mask_by_prefixes(tok, full, ids, spans))


# the last assistant turn gets another header than the generation prompt gives
ODD = ("{% for m in messages %}<|im_start|>{{ m.role }}{% if m.role == 'assistant' and loop.last %} (final)"
       "{% endif %}\n{{ m.content }}<|im_end|>\n{% endfor %}"
       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_template_that_renders_the_last_turn_differently_uses_the_fallback(smol):
    tok, _ = smol
    tpl = ChatTemplate(ODD, "odd")
    e = encode_record(Record("chat", 1, tuple(CHAT2)), tok, tpl)
    assert trained_runs(tok, e.ids, e.trained) == ["Hello! How can I help?<|im_end|>", "42 it is.<|im_end|>"]


def test_token_offsets_tile_the_text(smol, spm_tok):
    from gguf_finetune.data.jsonl import token_byte_offsets

    tok, tpl = smol
    text = tpl.render(CHAT2) + "caf\u00e9 \u2603  x"
    ids = tok.tokenize(text, special=True)
    off = token_byte_offsets(tok, ids, text.encode())
    assert off[0, 0] == 0 and off[-1, 1] == len(text.encode())
    np.testing.assert_array_equal(off[1:, 0], off[:-1, 1])  # byte-level BPE: pieces are the text
    text = "<s>the cat</s>\nsat on the mat"
    ids = spm_tok.tokenize(text, special=True)
    off = token_byte_offsets(spm_tok, ids, text.encode())
    assert off is not None and (np.diff(off[:, 0]) >= 0).all() and off[-1, 1] == len(text.encode())
    assert token_byte_offsets(spm_tok, ids, b"something else") is None


@pytest.mark.parametrize("name", ["odd", "chatml", "llama3", "gemma", "phi3", "pc"])
def test_masks_without_offsets_are_the_same(smol, monkeypatch, name):
    """The slow path (boundaries by tokenizing prefixes) agrees with the offsets path (see llama3)."""
    import gguf_finetune.data.jsonl as J

    tok, _ = smol
    if name == "pc":
        rec = Record("prompt_completion", 1, prompt="Q: x?\n\nA: ", completion="42 yes")
        tpl = None
    else:
        rec = Record("chat", 1, tuple(CHAT2))
        tpl = ChatTemplate(ODD, "odd") if name == "odd" else load_chat_template(name, None, tok)
    fast = encode_record(rec, tok, tpl)
    monkeypatch.setattr(J, "token_byte_offsets", lambda *a: None)
    slow = encode_record(rec, tok, tpl)
    np.testing.assert_array_equal(fast.ids, slow.ids)
    if name != "llama3":
        np.testing.assert_array_equal(fast.trained, slow.trained)
    else:
        # llama3's header ends in "\n\n", one token alone but two before the content: by prefixes the
        # slow path can only tell that the first of them straddles, so it also trains the whitespace
        extra = np.flatnonzero(slow.trained != fast.trained)
        assert extra.size and (slow.trained >= fast.trained).all()
        assert all(tok.token_to_piece(int(fast.ids[i]), True).strip() == b"" for i in extra)


def test_empty_assistant_reply(smol):
    tok, tpl = smol
    msgs = (CHAT2[0], {"role": "assistant", "content": ""}, *CHAT2[2:])
    e = encode_record(Record("chat", 1, msgs), tok, tpl)
    assert trained_runs(tok, e.ids, e.trained) == ["<|im_end|>", "42 it is.<|im_end|>"]  # learns to stop at once
    bare = ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}", "bare")  # no end-of-turn marker
    e = encode_record(Record("chat", 1, msgs), tok, bare)
    assert trained_runs(tok, e.ids, e.trained) == [" 42 it is."]


def test_template_that_drops_the_content_is_an_error(smol):
    tok, _ = smol
    tpl = ChatTemplate("{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}{% endfor %}",
                       "lossy")
    with pytest.raises(UserError, match="cannot find assistant message 1"):
        encode_record(Record("chat", 1, tuple(CHAT2)), tok, tpl)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_templates_train_the_contents_on_smollm2(smol, name):
    tok, _ = smol
    tpl = load_chat_template(name, None, tok)
    e = encode_record(Record("chat", 1, tuple(CHAT2)), tok, tpl)
    assert e.ids.tolist()[len(e.ids) - len(tok.tokenize(e.text, special=True)):] == tok.tokenize(e.text, special=True)
    runs = trained_runs(tok, e.ids, e.trained)
    assert len(runs) == 2
    assert "Hello! How can I help?" in runs[0] and "42 it is." in runs[1]
    assert "Hi there" not in "".join(runs) and "Say 42" not in "".join(runs)


# ------------------------------------------------------------------------------------------------
# SPM tokenizer (synthetic model): BOS handling, masks
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model
    from gguf_finetune.tokenizer import load_tokenizer

    p = write_synthetic_model(tmp_path_factory.mktemp("m") / "m.gguf", SyntheticSpec(n_vocab=400, n_embd=32, n_ff=64))
    return load_tokenizer(p)


@pytest.mark.parametrize("name", ["chatml", "llama2", "mistral", "zephyr"])
def test_spm_bos_once_and_contents_trained(spm_tok, name):
    tok = spm_tok
    msgs = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on the mat"}]
    e = encode_record(Record("chat", 1, tuple(msgs)), tok, load_chat_template(name, None, tok))
    assert tok.add_bos and e.ids[0] == tok.bos_id and e.ids[1] != tok.bos_id
    runs = trained_runs(tok, e.ids, e.trained)
    assert len(runs) == 1 and "sat on the mat" in runs[0] and "cat" not in runs[0]
    assert runs[0].rstrip().endswith(("</s>", "<|im_end|>"))


def test_spm_text_record_bos_and_eos(spm_tok):
    tok = spm_tok
    e = encode_record(Record("text", 1, text="the dog"), tok, None)
    assert e.ids.tolist() == [tok.bos_id] + tok.tokenize("the dog") + [tok.eos_id]
    assert e.trained.tolist() == [0] + [1] * (len(e.ids) - 1)


def test_load_jsonl_dataset_reports_and_counts(spm_tok, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in [
        {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat " * 40}]},
        {"text": "the dog"}, {"prompt": "a", "completion": "b"}]) + "\n")
    lines = []
    ds = load_jsonl_dataset(str(p), spm_tok, 16, template_for=lambda: load_chat_template("chatml", None, spm_tok),
                            report=lines.append)
    assert ds.n_samples == 3 and ds.lines.tolist() == [1, 2, 3]
    assert "load_jsonl: 3 records (chat: 1, prompt/completion: 1, text: 1)" in lines
    assert any("found 1 records" in ln and "cut off" in ln for ln in lines)
    assert ds.n_longer_than(16) == 1
    # no chat records: no template needed
    q = tmp_path / "t.jsonl"
    q.write_text('{"text": "the dog"}\n')
    assert load_jsonl_dataset(str(q), spm_tok, 16).n_samples == 1


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------
def random_dataset(rng, n, max_len, n_vocab=50):
    from gguf_finetune.data.jsonl import EncodedRecord

    enc = []
    for i in range(n):
        L = int(rng.integers(1, max_len + 1))
        ids = rng.integers(3, n_vocab, L).astype(np.int32)
        tr = (rng.random(L) < 0.6).astype(np.uint8)
        tr[0] = 0
        enc.append(EncodedRecord("", ids, tr, i + 1, "text"))
    return build_dataset(enc)


@pytest.mark.parametrize("fill", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_record_batch_matches_reference(fill, seed):
    rng = np.random.default_rng(seed)
    ds = random_dataset(rng, 7, 20)
    cfg = RecordBatchConfig(3, 9, fill)
    for start in (0, 4, 6):
        fast = record_batch(start, ds.begins, ds.sizes, ds.tokens, ds.trained, cfg, 2)
        ref = record_batch_ref(start, ds.begins, ds.sizes, ds.tokens, ds.trained, cfg, 2)
        for a, b in zip(fast[:3], ref[:3]):
            np.testing.assert_array_equal(a, b)
        assert fast[3] == ref[3]
        x, y, w, used = fast
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
        assert x.shape == y.shape == w.shape == (3, 9) and w.dtype == np.float32
        assert used >= 3 if fill else used == 3


def test_record_batch_rows_padding_and_first_token():
    from gguf_finetune.data.jsonl import EncodedRecord

    enc = [EncodedRecord("", np.array([10, 11, 12], np.int32), np.array([0, 1, 1], np.uint8), 1, "t"),
           EncodedRecord("", np.array([20, 21], np.int32), np.array([1, 1], np.uint8), 2, "t")]
    ds = build_dataset(enc)
    x, y, w, used = record_batch(0, ds.begins, ds.sizes, ds.tokens, ds.trained, RecordBatchConfig(2, 4), 2)
    assert x.tolist() == [[10, 11, 12, 2], [20, 21, 2, 2]]
    assert y.tolist() == [[11, 12, 2, 2], [21, 2, 2, 2]]
    assert w.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert used == 2
    x, y, w, used = record_batch(0, ds.begins, ds.sizes, ds.tokens, ds.trained, RecordBatchConfig(1, 6, True), 2)
    assert x.tolist() == [[10, 11, 12, 20, 21, 10]] and y.tolist() == [[11, 12, 20, 21, 10, 11]]
    assert w.tolist() == [[1, 1, 0, 1, 0, 1]]  # 12->20 crosses records: weight 0; 20's own flag is ignored
    assert used == 3


def test_eval_batches_cover_every_record_once():
    rng = np.random.default_rng(5)
    ds = random_dataset(rng, 7, 12)
    batches = record_eval_batches(ds, 3, 16, 2)
    assert [b[0].shape[0] for b in batches] == [3, 3, 1]
    total = sum(float(w.sum()) for _, _, w in batches)
    assert total == sum(int(ds.trained[b + 1:b + s].sum()) for b, s in zip(ds.begins, ds.sizes))


def test_iterator_state_epochs_and_resume():
    rng = np.random.default_rng(9)
    ds = random_dataset(rng, 5, 10)
    cfg = RecordBatchConfig(2, 8)
    st = resume_shuffle(None, ds, "d.jsonl", 7)
    it = RecordBatchIterator(ds, st, cfg, 2, 50)
    first = [it.next_batch() for _ in range(3)]
    assert [b.used_samples for b in first] == [2, 2, 2]
    assert [b.epoch_completed for b in first] == [False, False, True]
    assert it.state.epochs == 1 and it.state.next_sample == 0 and it.state.samples_seen == 6
    # the first epoch's order is shuffle_samples(mt19937(7))
    sh = shuffle_samples(st.rng_state, ds.begins, ds.sizes)
    b0 = sh.begins[0]
    assert first[0].tokens[0, 0] == ds.tokens[b0]
    saved = it.state
    cont = [it.next_batch() for _ in range(4)]
    again = RecordBatchIterator(ds, resume_shuffle(saved, ds, "d.jsonl", 123), cfg, 2, 50)
    for a, b in zip(cont, [again.next_batch() for _ in range(4)]):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.weights, b.weights)
    assert isinstance(saved, ShuffleState)


# ------------------------------------------------------------------------------------------------
# end to end: exact resume on JSONL data; bad data through the CLI
# ------------------------------------------------------------------------------------------------
WORDS = ["cat", "dog", "rat", "hen", "fox", "owl", "ant", "bee"]


def write_mixed(path):
    with open(path, "w") as f:
        for i, w in enumerate(WORDS * 2):
            k = i % 3
            if k == 0:
                rec = {"messages": [{"role": "user", "content": f"the {w}"},
                                    {"role": "assistant", "content": f"sat on the mat {i}"}]}
            elif k == 1:
                rec = {"prompt": f"the {w} ate", "completion": f" a {w} near the tree"}
            else:
                rec = {"text": f"the {w} sat on the mat and ate"}
            f.write(json.dumps(rec) + "\n")


@pytest.fixture
def work(tmp_path, monkeypatch):
    from gguf_finetune.synthetic import SyntheticSpec, write_synthetic_model

    write_synthetic_model(tmp_path / "m.gguf", SyntheticSpec(n_vocab=400, n_embd=32, n_ff=64, n_layer=2,
                                                             n_head=4, n_head_kv=2, seed=1))
    write_mixed(tmp_path / "train.jsonl")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def finetune(*extra: str, iters: int) -> None:
    from gguf_finetune.cli.finetune import run

    argv = ["--model-base", "m.gguf", "--train-data", "train.jsonl", "--chat-template", "chatml", "--ctx", "20",
            "--batch", "2", "--seed", "3", "--adam-alpha", "0.01", "--warmup", "2", "--threads", "1",
            "--lora-r", "2", "--checkpoint-in", "chk-LATEST.gguf", "--checkpoint-out", "chk-ITERATION.gguf",
            "--lora-out", "lora-ITERATION.gguf", "--save-every", "100", "--adam-iter", str(iters), *extra]
    assert run(argv) == 0


def read_ck(path):
    from gguf_finetune.formats.checkpoint import read_checkpoint
    from gguf_finetune.gguf_io import open_gguf
    from gguf_finetune.model import read_hparams

    return read_checkpoint(path, read_hparams(open_gguf("m.gguf")))


@pytest.mark.parametrize("extra", [(), ("--fill-with-next-samples",)])
def test_jsonl_resume_equals_uninterrupted_bit_for_bit(work, capsys, extra):
    N = 4  # 16 records, 2 per batch: the run crosses an epoch boundary
    finetune(*extra, iters=2 * N)
    whole = read_ck("chk-LATEST.gguf")
    os.rename("chk-LATEST.gguf", "whole.gguf")
    finetune(*extra, iters=N)
    first = read_ck("chk-LATEST.gguf")
    finetune(*extra, iters=N)
    resumed = read_ck("chk-LATEST.gguf")
    assert resumed.train.iteration == 2 * N
    np.testing.assert_array_equal(resumed.lora.flat, whole.lora.flat)
    np.testing.assert_array_equal(resumed.opt.m, whole.opt.m)
    assert resumed.train == whole.train
    assert not np.array_equal(first.lora.flat, whole.lora.flat)
    out = capsys.readouterr().out
    assert "load_jsonl: 16 records (chat: 6, prompt/completion: 5, text: 5)" in out
    assert "reshuffle samples. completed epochs: 1" in out


def test_masked_training_differs_from_train_on_prompt(work):
    finetune(iters=2)
    masked = read_ck("chk-LATEST.gguf").lora.flat.copy()
    os.remove("chk-LATEST.gguf")
    finetune("--train-on-prompt", iters=2)
    assert not np.array_equal(masked, read_ck("chk-LATEST.gguf").lora.flat)


@pytest.mark.parametrize("content, needle", [
    (b'{"text": "ok"}\n{"text": \n', "line 2, column"),
    (b'{"text": "\xc3("}\n', "line 1: invalid UTF-8 at byte"),
    (b'{"messages": [{"role": "user", "content": "q"}]}\n', "line 1: the conversation has no assistant turn"),
    (b'{"nothing": 1}\n', "line 1: no 'messages'"),
])
def test_bad_data_through_the_cli_is_one_line(work, capsys, content, needle):
    from gguf_finetune.cli.main import main

    (work / "bad.jsonl").write_bytes(content)
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--model-base", "m.gguf", "--train-data", "bad.jsonl", "--chat-template", "chatml",
              "--adam-iter", "1", "--checkpoint-out", "chk-ITERATION.gguf", "--lora-out", "lora-ITERATION.gguf"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "train data 'bad.jsonl'" in err and needle in err


def test_chat_data_without_any_template_is_a_clear_error(work, capsys):
    from gguf_finetune.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["finetune", "--model-base", "m.gguf", "--train-data", "train.jsonl", "--adam-iter", "1",
              "--checkpoint-out", "chk-ITERATION.gguf", "--lora-out", "lora-ITERATION.gguf"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "no tokenizer.chat_template" in err and "--chat-template" in err and err.count("\n") == 1
