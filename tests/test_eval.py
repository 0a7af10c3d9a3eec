"""graphllm.eval: loaders on fixture files in each benchmark's real format, harness prompt strings,
scoring with a deterministic fake scorer (known answer keys → known accuracies), GraphScorer on
tiny-llama against the eager model, the lm_eval adapter's methods, and the CLI."""

from __future__ import annotations

import csv
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from graphllm.cli.main import EXIT_USER_ERROR, main
from graphllm.errors import GraphllmError
from graphllm.eval import EvalConfig, GraphScorer, evaluate
from graphllm.eval.runner import BBH_STOP
from graphllm.eval.scorer import bucket_length, cut_at_stop
from graphllm.eval.tasks import load_agieval, load_bbh, load_boolq, load_ceval, load_mmlu

# Batched, right-padded, compiled scores vs the eager model on each request alone: the same fp32
# math with a different batch size/padding, so only reduction order differs (fp32: ~1e-5 relative
# on log-probs summed over a few tokens of an 8000-way softmax).
LOGPROB_ATOL = 1e-4


# ---- fixtures in the published formats ---------------------------------------------------------

def write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


def mc_rows(prefix: str, n: int) -> list[list[str]]:
    """n questions `prefix-i`; the answer letter cycles A, B, C, D."""
    return [[f"{prefix}-{i}: which option?", f"opt{i}a", f"opt{i}b", f"opt{i}c", f"opt{i}d", "ABCD"[i % 4]]
            for i in range(n)]


def make_mmlu(root: Path) -> Path:
    for subject in ("abstract_algebra", "anatomy"):
        write_csv(root / "data" / "dev" / f"{subject}_dev.csv", mc_rows(f"{subject}-dev", 5))
        write_csv(root / "data" / "test" / f"{subject}_test.csv", mc_rows(f"{subject}-test", 8))
    return root


def make_ceval(root: Path) -> Path:
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    for split, n in (("dev", 5), ("val", 6)):
        rows = [[str(i), *r, "because"] for i, r in enumerate(mc_rows(f"ceval-{split}", n))]
        write_csv(root / split / f"computer_network_{split}.csv", rows, header)
    return root


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def make_boolq(root: Path) -> Path:
    write_jsonl(root / "train.jsonl", [{"question": f"boolq-train-{i}", "passage": "p", "answer": i % 2 == 0}
                                       for i in range(3)])
    write_jsonl(root / "dev.jsonl", [{"question": f"boolq-{i}", "title": "t", "passage": f"passage {i}",
                                      "answer": i % 3 == 0} for i in range(6)])
    return root


def make_bbh(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for task in ("boolean_expressions", "date_understanding"):
        ex = [{"input": f"{task}-{i}", "target": f"T{i}"} for i in range(6)]
        (root / f"{task}.json").write_text(json.dumps({"canary": "x", "examples": ex}))
    return root


def make_agieval(root: Path) -> Path:
    recs = [{"passage": None, "question": f"lsat-{i}", "options": ["(A)x", "(B)yy", "(C)zzz", "(D)w", "(E)v"],
             "label": "ABCDE"[i % 5], "other": None} for i in range(5)]
    write_jsonl(root / "lsat-lr.jsonl", recs)
    write_jsonl(root / "math.jsonl", [{"passage": None, "question": "1+1", "options": None, "label": None,
                                       "answer": "2"}])  # cloze: skipped
    return root


# ---- a deterministic scorer with an answer key -------------------------------------------------

class KeyScorer:
    """Knows question `<id>` when id's trailing number is even: it then prefers the gold choice, else the
    next one. Identifies the question by the last `<prefix>-<n>` in the context (shots come before it)."""

    def __init__(self, gold_of: dict[str, str]) -> None:
        self.gold_of = gold_of
        self.requests: list[tuple[str, str]] = []
        self.generate_calls: list[tuple[list[str], list[str], int]] = []

    def _qid(self, context: str) -> str:
        return re.findall(r"[a-z_]+(?:-[a-z]+)*-\d+", context)[-1]

    def loglikelihood(self, requests):
        self.requests.extend(requests)
        out = []
        for context, continuation in requests:
            qid = self._qid(context)
            gold, options = self.gold_of[qid]
            want = gold if int(qid.rsplit("-", 1)[1]) % 2 == 0 else options[(options.index(gold) + 1) % len(options)]
            out.append((0.0 if continuation == " " + want else -3.0, False))
        return out

    def generate_until(self, prompts, stop, max_new_tokens):
        self.generate_calls.append((list(prompts), list(stop), max_new_tokens))
        texts = []
        for p in prompts:
            qid = self._qid(p)
            n = int(qid.rsplit("-", 1)[1])
            text = f" T{n}\n\nQ: more" if n % 2 == 0 else " wrong"
            texts.append(cut_at_stop(text, stop)[0])
        return texts


def key_for(subjects) -> dict[str, tuple[str, list[str]]]:
    key = {}
    for s in subjects:
        for d in s.docs:
            qid = re.findall(r"[a-z_]+(?:-[a-z]+)*-\d+", d.query)[-1]
            key[qid] = (d.choices[d.gold[0]], d.choices)
    return key


# ---- loaders and prompts -----------------------------------------------------------------------

def test_mmlu_prompt_matches_harness_format(tmp_path: Path) -> None:
    root = tmp_path / "mmlu"
    write_csv(root / "dev" / "abstract_algebra_dev.csv", [["Find 1+1.", "1", "2", "3", "4", "B"]])
    write_csv(root / "test" / "abstract_algebra_test.csv", [[" What is 2*2? ", "4", "8", "6", "2", "A"]])
    [subject] = load_mmlu(root)
    doc = subject.docs[0]
    expected = ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                "Find 1+1.\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                "What is 2*2?\nA. 4\nB. 8\nC. 6\nD. 2\nAnswer:")
    assert subject.prompt(doc, 1) == expected
    assert doc.choices == ["A", "B", "C", "D"] and doc.gold == [0]
    requests = []

    class Recorder:
        def loglikelihood(self, reqs):
            requests.extend(reqs)
            return [(0.0, False)] * len(reqs)

    evaluate(Recorder(), EvalConfig(task="mmlu", data=root, shots=1))
    assert requests == [(expected, " A"), (expected, " B"), (expected, " C"), (expected, " D")]


def test_ceval_boolq_agieval_bbh_prompts(tmp_path: Path) -> None:
    [ce] = load_ceval(make_ceval(tmp_path / "ceval"))
    assert ce.prompt(ce.docs[0], 1) == (
        "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n"
        "ceval-dev-0: which option?\nA. opt0a\nB. opt0b\nC. opt0c\nD. opt0d\n答案： A\n\n"
        "ceval-val-0: which option?\nA. opt0a\nB. opt0b\nC. opt0c\nD. opt0d\n答案：")
    [bq] = load_boolq(make_boolq(tmp_path / "boolq"))
    assert bq.docs[0].query == "passage 0\nQuestion: boolq-0?\nAnswer:"
    assert [d.gold[0] for d in bq.docs] == [1, 0, 0, 1, 0, 0] and bq.docs[0].choices == ["no", "yes"]
    [ag] = load_agieval(make_agieval(tmp_path / "agieval"))  # math.jsonl (cloze) is skipped
    assert ag.name == "lsat-lr" and ag.docs[1].gold == [1]
    assert ag.docs[0].query == ("Q: lsat-0 Answer Choices: (A)x (B)yy (C)zzz (D)w (E)v\n"
                                "A: Among A through E, the answer is")
    bbh = load_bbh(make_bbh(tmp_path / "bbh"), shots=2)
    assert [s.name for s in bbh] == ["boolean_expressions", "date_understanding"]
    assert len(bbh[0].shots) == 2 and len(bbh[0].docs) == 4
    assert bbh[0].prompt(bbh[0].docs[0], 2) == ("Q: boolean_expressions-0\nA: T0\n\nQ: boolean_expressions-1\nA: T1\n\n"
                                                "Q: boolean_expressions-2\nA:")


@pytest.mark.parametrize("task, make, shots, expected", [
    # 8 test questions per subject, ids 0..7: the even ones (4) are known -> 0.5 per subject
    ("mmlu", make_mmlu, 5, {"abstract_algebra": 0.5, "anatomy": 0.5}),
    ("ceval", make_ceval, 2, {"computer_network": 0.5}),  # ids 0..5: 0, 2, 4 known
    ("boolq", make_boolq, 1, {"boolq": 0.5}),
    ("agieval", make_agieval, 0, {"lsat-lr": 0.6}),  # ids 0..4: 0, 2, 4 known
])
def test_choice_task_accuracy_is_the_answer_key(task, make, shots, expected, tmp_path: Path) -> None:
    from graphllm.eval.tasks import load_task

    data = make(tmp_path / task)
    scorer = KeyScorer(key_for(load_task(task, data, shots=shots)))
    res = evaluate(scorer, EvalConfig(task=task, data=data, shots=shots))
    assert {k: v["acc"] for k, v in res["subjects"].items()} == pytest.approx(expected)
    n = sum(v["n"] for v in res["subjects"].values())
    assert res["overall"]["n"] == n
    assert res["overall"]["acc"] == pytest.approx(sum(expected[k] * res["subjects"][k]["n"] for k in expected) / n)
    if task == "mmlu":  # both fixture subjects are STEM in the harness's grouping
        assert res["groups"] == {"stem": pytest.approx({"n": n, "acc": 0.5, "acc_macro": 0.5, "acc_norm": 0.5,
                                                        "acc_norm_macro": 0.5})}
    # one loglikelihood call holds every choice of every question (batched across subjects)
    assert len(scorer.requests) == sum(len(d.choices) for s in load_task(task, data, shots=shots) for d in s.docs)


def test_limit_and_acc_norm(tmp_path: Path) -> None:
    data = make_agieval(tmp_path / "agieval")

    class LengthScorer:  # ll = -(2 + 0.1·len): acc picks the shortest choice, acc_norm the longest
        def loglikelihood(self, requests):
            return [(-(2 + 0.1 * len(c)), False) for _, c in requests]

    res = evaluate(LengthScorer(), EvalConfig(task="agieval", data=data, limit=3))
    sub = res["subjects"]["lsat-lr"]
    assert sub["n"] == 3
    # shortest option is (D)w (index 3) or (A)x (index 0, first max); longest is (C)zzz (index 2); gold A, B, C
    assert sub["acc"] == pytest.approx(1 / 3) and sub["acc_norm"] == pytest.approx(1 / 3)
    res = evaluate(LengthScorer(), EvalConfig(task="agieval", data=data, limit=3, log_samples=True))
    preds = [(s["pred"], s["pred_norm"]) for s in res["subjects"]["lsat-lr"]["samples"]]
    assert preds == [(0, 2)] * 3


def test_bbh_exact_match_and_stop_strings(tmp_path: Path) -> None:
    data = make_bbh(tmp_path / "bbh")
    scorer = KeyScorer({})
    res = evaluate(scorer, EvalConfig(task="bbh", data=data, shots=3, max_new_tokens=32))
    # scored ids 3, 4, 5 per task: only 4 is known and its output " T4\n\nQ: more" is cut at "\n\n"
    assert {k: v["exact_match"] for k, v in res["subjects"].items()} == pytest.approx(
        {"boolean_expressions": 1 / 3, "date_understanding": 1 / 3})
    [(prompts, stop, budget)] = scorer.generate_calls
    assert stop == list(BBH_STOP) and budget == 32 and len(prompts) == 6
    assert prompts[0].startswith("Q: boolean_expressions-0\nA: T0\n\n") and prompts[0].endswith("-3\nA:")


@pytest.mark.parametrize("setup, needle", [
    (lambda p: None, "no such directory"),
    (lambda p: write_csv(p / "test" / "x_test.csv", [["q", "a", "b"]]), "x_test.csv:1: 3 fields, expected 6"),
    (lambda p: write_csv(p / "test" / "x_test.csv", [["q", "a", "b", "c", "d", "E"]]), "answer 'E' is not one of"),
    (lambda p: (p / "dev").mkdir(parents=True), "no test/ folder"),
])
def test_mmlu_bad_data_is_one_error(setup, needle, tmp_path: Path) -> None:
    root = tmp_path / "mmlu"
    setup(root)
    with pytest.raises(GraphllmError, match=re.escape(needle)):
        evaluate(KeyScorer({}), EvalConfig(task="mmlu", data=root))


def test_other_loaders_refuse_bad_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "bq" / "val.jsonl", [{"question": "q", "passage": "p", "label": "maybe"}])
    with pytest.raises(GraphllmError, match=r"val.jsonl:1: needs `label` or `answer` true/false"):
        load_boolq(tmp_path / "bq")
    (tmp_path / "bbh").mkdir()
    (tmp_path / "bbh" / "t.json").write_text(json.dumps({"examples": [{"input": "x"}]}))
    with pytest.raises(GraphllmError, match=r"t.json examples\[0\]: record lacks key\(s\) target"):
        load_bbh(tmp_path / "bbh")
    write_csv(tmp_path / "ce" / "val" / "law_val.csv", [["1", "q"]], header=["id", "question"])
    with pytest.raises(GraphllmError, match="lacks column"):
        load_ceval(tmp_path / "ce")
    with pytest.raises(GraphllmError, match="--shots 9: subject abstract_algebra has only 5"):
        evaluate(KeyScorer({}), EvalConfig(task="mmlu", data=make_mmlu(tmp_path / "m"), shots=9))


def test_bucket_length_and_stop_cut() -> None:
    assert [bucket_length(n, min_bucket=32, max_length=100) for n in (1, 32, 33, 64, 65, 99)] == [32, 32, 64, 64, 100, 100]
    assert cut_at_stop("abc\n\nQ: d", ["Q:", "\n\n"]) == ("abc", True)
    assert cut_at_stop("abc", ["Q:"]) == ("abc", False)


# ---- GraphScorer on tiny-llama -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_scorer() -> GraphScorer:
    from graphllm.eval import build_scorer

    return build_scorer("tiny-llama", batch_size=4, backend="eager", max_length=64)


def eager_loglikelihood(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """The unbatched, unpadded, uncompiled reference."""
    full = ctx + cont
    with torch.no_grad():
        logits = model(torch.tensor([full[:-1]]))[0, len(ctx) - 1:].float().log_softmax(-1)
    tgt = torch.tensor(cont)
    return logits.gather(-1, tgt[:, None]).sum().item(), bool((logits.argmax(-1) == tgt).all())


def same_scores(a: list[tuple[float, bool]], b: list[tuple[float, bool]]) -> bool:
    """(log-likelihood, is-greedy) pairs equal: scores within LOGPROB_ATOL, flags exactly (pytest.approx
    refuses nested tuples since pytest 9.1)."""
    return len(a) == len(b) and all(abs(x[0] - y[0]) <= LOGPROB_ATOL and x[1] == y[1] for x, y in zip(a, b))


def test_graph_scores_equal_eager_unbatched(tiny_scorer: GraphScorer) -> None:
    requests = [("The following are multiple choice questions.\n\nQ: 2+2?\nAnswer:", " A"),
                ("Answer:", " B"), ("", "hello world"), ("def f(x):\n    return", " x + 1"),
                ("Q: what is the capital of France?\nA:", " Paris is the capital"), ("x" * 10, " no"),
                ("A longer context " * 6, " yes")]  # 7 requests: one full batch of 4, one padded batch
    got = tiny_scorer.loglikelihood(requests)
    assert {shape[1] for shape in tiny_scorer.graphs} <= {32, 64} and all(b == 4 for b, _ in tiny_scorer.graphs)
    for (ctx, cont), (score, greedy) in zip(requests, got):
        want = eager_loglikelihood(tiny_scorer.model, *tiny_scorer.encode_pair(ctx, cont))
        assert score == pytest.approx(want[0], abs=LOGPROB_ATOL) and greedy == want[1], (ctx, cont)
    compiled = dict(tiny_scorer.graphs)
    assert same_scores(tiny_scorer.loglikelihood(requests[:2]), got[:2])
    assert tiny_scorer.graphs == compiled  # graphs are reused, not recompiled


def test_choices_of_one_question_share_a_row(tiny_scorer: GraphScorer) -> None:
    ctx = "Q: 2+2?\nAnswer:"
    assert all(len(tiny_scorer.encode_pair(ctx, f" {c}")[1]) == 1 for c in "ABCD")  # one-token answers
    before = dict(tiny_scorer.stats)
    got = tiny_scorer.loglikelihood([(ctx, f" {c}") for c in "ABCD"] + [(ctx, " 4 apples")])
    assert tiny_scorer.stats["rows"] - before["rows"] == 2 and tiny_scorer.stats["calls"] - before["calls"] == 1
    for c, (score, _) in zip("ABCD", got):
        assert score == pytest.approx(eager_loglikelihood(tiny_scorer.model, *tiny_scorer.encode_pair(ctx, f" {c}"))[0],
                                      abs=LOGPROB_ATOL)


def test_rolling_loglikelihood_windows(tiny_scorer: GraphScorer) -> None:
    text = "graph mode evaluation " * 20
    toks = tiny_scorer.tokenizer.encode(text)
    assert tiny_scorer.max_length == 64 < len(toks) <= 128  # two windows
    # the harness's windows: the first 64 tokens from the prefix token (BOS, else EOS); the rest from as much
    # of the text before them as fills max_length + 1 (lm_eval.utils.get_rolling_token_windows, made disjoint)
    want = eager_loglikelihood(tiny_scorer.model, [tiny_scorer.prefix_id], toks[:64])[0]
    want += eager_loglikelihood(tiny_scorer.model, toks[len(toks) - 65: 64], toks[64:])[0]
    assert tiny_scorer.loglikelihood_rolling([text]) == pytest.approx([want], abs=LOGPROB_ATOL)


def test_greedy_fallback_matches_eager_greedy(tiny_scorer: GraphScorer, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "graphllm.generate", None)  # not importable: the fallback runs
    prompts = ["Once upon a time", "def add(a, b):"]
    got = tiny_scorer.generate_until(prompts, ["\n\n"], 5)
    tok = tiny_scorer.tokenizer
    for prompt, text in zip(prompts, got):
        ids = tok.encode(prompt)
        for _ in range(5):
            with torch.no_grad():
                ids.append(int(tiny_scorer.model(torch.tensor([ids]))[0, -1].argmax()))
        assert text == cut_at_stop(tok.decode(ids[len(tok.encode(prompt)):]), ["\n\n"])[0]


def test_generate_uses_graphllm_generate_when_importable(tiny_scorer: GraphScorer, monkeypatch) -> None:
    calls = []
    fake = types.ModuleType("graphllm.generate")
    fake.generate_until = lambda scorer, prompts, *, stop, max_new_tokens: calls.append(prompts) or ["ok\n\nQ:"] * len(prompts)
    monkeypatch.setitem(sys.modules, "graphllm.generate", fake)
    assert tiny_scorer.generate_until(["a", "b"], ["\n\n"], 4) == ["ok", "ok"]
    assert calls == [["a", "b"]]


# ---- lm_eval adapter ---------------------------------------------------------------------------

class Req:
    """Duck-typed lm_eval Instance: the adapter only reads `.args`."""

    def __init__(self, *args) -> None:
        self.args = args


def test_harness_methods_on_duck_typed_requests() -> None:
    from graphllm.eval.harness_requests import HarnessMethods

    class Recorder:
        def __init__(self) -> None:
            self.calls = []

        def loglikelihood(self, requests):
            self.calls.append(("ll", list(requests)))
            return [(-1.0, True)] * len(requests)

        def loglikelihood_rolling(self, texts):
            self.calls.append(("rolling", list(texts)))
            return [-2.0] * len(texts)

        def generate_until(self, prompts, stop, max_new_tokens):
            self.calls.append(("gen", list(prompts), stop, max_new_tokens))
            return [f"out:{p}" for p in prompts]

    lm = HarnessMethods()
    lm.scorer = rec = Recorder()
    assert lm.loglikelihood([Req("Answer:", " A"), Req("Answer:", " B")]) == [(-1.0, True)] * 2
    assert lm.loglikelihood_rolling([Req("hello there")]) == [-2.0]
    out = lm.generate_until([Req("a", {"until": ["\n"], "max_gen_toks": 3}),
                             Req("c", {"max_gen_toks": 2, "temperature": 0.0}),
                             Req("b", {"until": "\n", "max_gen_toks": 3, "do_sample": False})])
    assert out == ["out:a", "out:c", "out:b"]  # request order kept across groups
    assert rec.calls == [("ll", [("Answer:", " A"), ("Answer:", " B")]), ("rolling", ["hello there"]),
                         ("gen", ["a", "b"], ["\n"], 3), ("gen", ["c"], [], 2)]  # same settings -> one batch


def test_lm_eval_adapter_subclasses_lm(tiny_scorer: GraphScorer, monkeypatch) -> None:
    """With lm_eval installed, the real LM base; without it, a stand-in module with the same two names."""
    stand_in = False
    try:
        import lm_eval.api.model  # noqa: F401
    except ImportError:
        stand_in = True
        lm_eval = types.ModuleType("lm_eval")
        api = types.ModuleType("lm_eval.api")
        model_mod = types.ModuleType("lm_eval.api.model")
        registry = types.ModuleType("lm_eval.api.registry")
        model_mod.LM = type("LM", (), {"__init__": lambda self: None})
        registered = {}
        registry.register_model = lambda *names: (lambda cls: registered.update(dict.fromkeys(names, cls)) or cls)
        for name, mod in [("lm_eval", lm_eval), ("lm_eval.api", api), ("lm_eval.api.model", model_mod),
                          ("lm_eval.api.registry", registry)]:
            monkeypatch.setitem(sys.modules, name, mod)
    if stand_in:  # import the adapter against the stand-in (the real registry refuses a second registration)
        sys.modules.pop("graphllm.eval.lm_eval_adapter", None)
    try:
        from graphllm.eval.lm_eval_adapter import GraphllmLM

        lm = GraphllmLM(scorer=tiny_scorer, device="cpu")
        assert isinstance(lm, sys.modules["lm_eval.api.model"].LM)
        assert same_scores(lm.loglikelihood([Req("Answer:", " A")]), tiny_scorer.loglikelihood([("Answer:", " A")]))
    finally:
        if stand_in:
            sys.modules.pop("graphllm.eval.lm_eval_adapter", None)  # it holds the stand-in LM


# ---- CLI ---------------------------------------------------------------------------------------

def test_cli_eval_mmlu_writes_json(tiny_scorer: GraphScorer, tmp_path: Path, capsys, monkeypatch) -> None:
    built = {}

    def build(model, **kw):  # build_scorer's arguments come from the flags; reuse the compiled tiny-llama
        built.update(kw, model=model)
        return tiny_scorer

    monkeypatch.setattr("graphllm.eval.build_scorer", build)
    data = make_mmlu(tmp_path / "mmlu")
    out = tmp_path / "results.json"
    rc = main(["eval", "--model", "tiny-llama", "--task", "mmlu", "--data", str(data), "--limit", "1",
               "--batch-size", "4", "--max-length", "64", "--backend", "eager", "--out", str(out)])
    assert rc == 0
    assert built == {"model": "tiny-llama", "tokenizer": None, "batch_size": 4, "backend": "eager", "max_length": 64,
                     "seed": 0, "amp": "fp32"}
    res = json.loads(out.read_text())
    assert res["overall"]["n"] == 2 and set(res["subjects"]) == {"abstract_algebra", "anatomy"}
    assert 0.0 <= res["overall"]["acc"] <= 1.0 and res["config"]["model"] == "tiny-llama"
    assert res["config"]["graphs_compiled"] and all(b == 4 for b, _ in res["config"]["graphs_compiled"])
    assert "abstract_algebra" in capsys.readouterr().out


def test_cli_eval_needs_a_model_and_names_it(tmp_path: Path, capsys) -> None:
    """No --model used to score a random tiny-llama and exit 0."""
    assert main(["eval", "--task", "mmlu", "--data", str(make_mmlu(tmp_path / "mmlu"))]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model is required" in err, err


def test_cli_eval_warns_how_many_inputs_max_length_cut(tiny_scorer: GraphScorer, tmp_path: Path, capsys,
                                                      monkeypatch) -> None:
    from graphllm.eval import build_scorer

    short = build_scorer("tiny-llama", batch_size=4, backend="eager", max_length=8)
    short.model = tiny_scorer.model  # the same weights; its own 8-token graphs
    monkeypatch.setattr("graphllm.eval.build_scorer", lambda model, **kw: short)
    assert main(["eval", "--model", "tiny-llama", "--task", "mmlu", "--data", str(make_mmlu(tmp_path / "mmlu")),
                 "--limit", "1", "--max-length", "8"]) == 0
    captured = capsys.readouterr()
    assert short.stats["truncated"] == 8  # 2 questions × 4 choices, every one longer than 8 tokens
    assert "8 input(s) longer than --max-length 8 kept only their last tokens" in captured.err, captured.err
    assert captured.out.startswith("# tiny-llama: mmlu (0-shot)"), captured.out


@pytest.mark.parametrize("argv, needle", [
    (["--task", "mmlu", "--data", "{tmp}/nonexistent"], "/nonexistent: no such file or directory"),
    (["--task", "bbh", "--data", "{tmp}"], "no <task>.json files"),
    (["--task", "ceval", "--data", "{tmp}"], "no val/ folder"),
    (["--task", "mmlu"], "--task mmlu needs --data DIR"),
])
def test_cli_bad_data_is_one_line_exit_2(argv, needle, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("graphllm.eval.build_scorer", lambda *a, **k: KeyScorer({}))  # no model needed
    assert main(["eval", "--model", "tiny-llama", *(a.format(tmp=tmp_path) for a in argv)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
