"""Loss plots from a metrics JSONL file: reading (duplicates, validation records, bad lines) and drawing."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import needs
from gguf_finetune.errors import UserError
from gguf_finetune.plot import plot_curves, read_metrics


def write_lines(path, recs):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return path


def test_read_metrics_training_and_validation(tmp_path):
    p = write_lines(tmp_path / "m.jsonl", [
        {"iter": 1, "loss": 3.0, "lr": 1e-3}, {"iter": 2, "loss": 2.8}, {"iter": 3, "loss": 2.7},
        {"iter": 2, "val_loss": 2.9},
        # a resumed run appends from its checkpoint: iterations 3.. again, the later record wins
        {"iter": 3, "loss": 2.65}, {"iter": 4, "loss": 2.5}, {"iter": 4, "val_loss": 2.6},
        "", {"event": "start"},
    ])
    c = read_metrics(p)
    assert c.train_iter == [1, 2, 3, 4] and c.train_loss == [3.0, 2.8, 2.65, 2.5]
    assert c.val_iter == [2, 4] and c.val_loss == [2.9, 2.6]


@pytest.mark.parametrize("line,msg", [("{not json", "line 1 is not JSON"),
                                      ('{"iter": "x", "loss": 1}', "'iter' should be an integer"),
                                      ('{"iter": 1, "loss": "high"}', "'loss' should be a number")])
def test_read_metrics_bad_lines(tmp_path, line, msg):
    with pytest.raises(UserError, match=msg):
        read_metrics(write_lines(tmp_path / "m.jsonl", [line]))


def test_read_metrics_empty_or_missing(tmp_path):
    with pytest.raises(UserError, match="no 'loss' or 'val_loss' records"):
        read_metrics(write_lines(tmp_path / "m.jsonl", [{"iter": 1, "lr": 0.1}]))
    with pytest.raises(UserError, match="cannot read"):
        read_metrics(tmp_path / "missing.jsonl")


def test_plot_writes_an_image(tmp_path, capsys):
    needs("matplotlib")
    from gguf_finetune.cli.plot import run

    p = write_lines(tmp_path / "m.jsonl", [{"iter": i, "loss": 3.0 / i} for i in range(1, 20)]
                    + [{"iter": 10, "val_loss": 0.5}])
    out = tmp_path / "loss.png"
    assert run([str(p), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "19 training points, 1 validation points" in capsys.readouterr().err
    svg = tmp_path / "loss.svg"
    plot_curves(read_metrics(p), svg, title="run 1")
    assert b"<svg" in svg.read_bytes()[:500]
    with pytest.raises(UserError, match="unknown image format"):
        run([str(p), "-o", str(tmp_path / "loss.nope")])
    assert not (tmp_path / "loss.nope").exists()


def test_missing_matplotlib_is_a_user_error(tmp_path, monkeypatch):
    p = write_lines(tmp_path / "m.jsonl", [{"iter": 1, "loss": 1.0}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(UserError, match="pip install matplotlib"):
        plot_curves(read_metrics(p), tmp_path / "x.png")
