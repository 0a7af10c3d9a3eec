"""Benchmarks as graphllm reads them: a local directory in the benchmark's published format → subjects
of documents, each document turned into text with lm-evaluation-harness's template for the task.

| task | files | documents scored | few-shot examples | harness template |
|---|---|---|---|---|
| mmlu | `[data/]{dev,test,val}/<subject>_<split>.csv`, no header: question,A,B,C,D,answer | `test` (or `val`) | first k of `dev` | `mmlu/default` |
| ceval | `{dev,val,test}/<subject>_<split>.csv`, header id,question,A,B,C,D,answer[,explanation] | `val` | first k of `dev` | `ceval-valid` |
| boolq | `train.jsonl`, `val.jsonl` (SuperGLUE: label) or `dev.jsonl` (Google: answer) | val/dev | first k of train | `super_glue/boolq` |
| bbh | `<task>.json` = {"examples": [{"input", "target"}]} | the rest of the file | first k of the file | `bbh/zeroshot` |
| agieval | `<dataset>.jsonl`: passage, question, options ["(A)…"], label | the rest of the file | first k of the file | `agieval` (AGIEval's zero-shot prompt) |

A document's `query` is the harness's `doc_to_text`; a few-shot prompt is the subject's description,
then each shot as `query + " " + answer + "\\n\\n"`, then the document's query (the harness's
target_delimiter " " and fewshot_delimiter "\\n\\n").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from graphllm.errors import GraphllmError
from graphllm.eval.ceval_subjects import CEVAL_SUBJECTS_ZH
from graphllm.eval.formats import check_keys, read_csv, read_json, read_jsonl, require_dir

logger = logging.getLogger("graphllm.eval")
LETTERS = "ABCDEFG"
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
# AGIEval's English datasets (its dataset_loader's english_qa_datasets); the others get the Chinese prompt.
AGIEVAL_ENGLISH = frozenset({"lsat-ar", "lsat-lr", "lsat-rc", "logiqa-en", "sat-math", "sat-en", "aqua-rat",
                             "sat-en-without-passage", "gaokao-english"})


@dataclass(kw_only=True, slots=True)
class Doc:
    """One benchmark item: the text the model reads, and either choices (scored) or a target (generated)."""

    query: str
    """The harness's doc_to_text, without few-shot examples or description."""
    choices: list[str] = field(default_factory=list)
    """Choice texts without the delimiter ("A", "yes", "(A)…"); empty for generation tasks."""
    gold: list[int] = field(default_factory=list)
    """Index(es) of the correct choice(s): more than one only for AGIEval's multi-answer items."""
    target: str = ""
    """Expected generated text (generation tasks)."""

    @property
    def answer(self) -> str:
        """What follows the query in a few-shot example."""
        return self.choices[self.gold[0]] if self.choices else self.target


@dataclass(kw_only=True, slots=True)
class Subject:
    name: str
    description: str
    shots: list[Doc]
    docs: list[Doc]

    def prompt(self, doc: Doc, k: int) -> str:
        """The few-shot context for `doc` (k examples)."""
        if k > len(self.shots):
            raise GraphllmError(f"--shots {k}: subject {self.name} has only {len(self.shots)} few-shot examples")
        examples = "".join(s.query + TARGET_DELIMITER + s.answer + FEWSHOT_DELIMITER for s in self.shots[:k])
        return self.description + examples + doc.query


def mmlu_query(question: str, options: list[str]) -> str:
    lines = [question.strip()] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _letter_index(letter: str, n: int, where: str) -> int:
    idx = LETTERS.find(letter.strip().upper()) if letter.strip() else -1
    if not 0 <= idx < n:
        raise GraphllmError(f"{where}: answer {letter!r} is not one of {', '.join(LETTERS[:n])}")
    return idx


def _csv_subjects(root: Path, split: str, task: str) -> list[tuple[str, Path]]:
    folder = root / split
    if not folder.is_dir():
        raise GraphllmError(f"--data {root}: no {split}/ folder; a {task} directory holds dev/ and {split}/ "
                            f"with <subject>_<split>.csv files")
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise GraphllmError(f"--data {root}: {folder} has no *_{split}.csv files")
    return [(f.name[: -len(f"_{split}.csv")], f) for f in files]


def load_mmlu(data: Path, split: str = "test") -> list[Subject]:
    """MMLU's `data.tar` layout (hendrycks/test): `data/dev/<s>_dev.csv`, `data/test/<s>_test.csv`."""
    root = require_dir(data, "MMLU data folder (the one holding dev/ and test/)")
    if not (root / "dev").is_dir() and (root / "data" / "dev").is_dir():
        root = root / "data"
    cols = ["question", "A", "B", "C", "D", "answer"]
    subjects = []
    for name, path in _csv_subjects(root, split, "MMLU"):
        dev = root / "dev" / f"{name}_dev.csv"

        def docs(p: Path) -> list[Doc]:
            rows = read_csv(p, columns=cols, header=False)
            return [Doc(query=mmlu_query(r["question"], [r[c] for c in "ABCD"]), choices=list("ABCD"),
                        gold=[_letter_index(r["answer"], 4, f"{p}:{i}")]) for i, r in enumerate(rows, start=1)]

        subjects.append(Subject(name=name, description=mmlu_description(name), shots=docs(dev) if dev.is_file() else [],
                                docs=docs(path)))
    return subjects


def load_ceval(data: Path, split: str = "val") -> list[Subject]:
    """CEval's `ceval-exam.zip` layout: `dev/`, `val/`, `test/` of `<subject>_<split>.csv` with a header row."""
    root = require_dir(data, "CEval folder (the one holding dev/ and val/)")
    cols = ["question", "A", "B", "C", "D", "answer"]
    subjects = []
    for name, path in _csv_subjects(root, split, "CEval"):
        dev = root / "dev" / f"{name}_dev.csv"

        def docs(p: Path) -> list[Doc]:
            rows = read_csv(p, columns=cols, header=True)
            return [Doc(query=ceval_query(r), choices=list("ABCD"), gold=[_letter_index(r["answer"], 4, f"{p}:{i}")])
                    for i, r in enumerate(rows, start=2)]

        zh = CEVAL_SUBJECTS_ZH.get(name, name.replace("_", " "))
        subjects.append(Subject(name=name, description=f"以下是中国关于{zh}的单项选择题，请选出其中的正确答案。\n\n",
                                shots=docs(dev) if dev.is_file() else [], docs=docs(path)))
    return subjects


def ceval_query(row: dict[str, str]) -> str:
    return f"{row['question'].strip()}\nA. {row['A']}\nB. {row['B']}\nC. {row['C']}\nD. {row['D']}\n答案："


def load_boolq(data: Path, split: str = "val") -> list[Subject]:
    """BoolQ jsonl: SuperGLUE's `train.jsonl`/`val.jsonl` (`label`) or Google's `train.jsonl`/`dev.jsonl` (`answer`)."""
    root = require_dir(data, "BoolQ folder (train.jsonl and val.jsonl or dev.jsonl)")
    names = [f"{split}.jsonl"] + (["dev.jsonl"] if split == "val" else [])
    path = next((root / n for n in names if (root / n).is_file()), None)
    if path is None:
        raise GraphllmError(f"--data {root}: no {' or '.join(names)}; BoolQ is read from SuperGLUE's or Google's jsonl files")

    def docs(p: Path) -> list[Doc]:
        out = []
        for i, rec in enumerate(read_jsonl(p, required=("question", "passage")), start=1):
            label = rec.get("label", rec.get("answer"))
            if not isinstance(label, (bool, int)) or label not in (0, 1):
                raise GraphllmError(f"{p}:{i}: needs `label` or `answer` true/false, got {label!r}")
            out.append(Doc(query=f"{rec['passage']}\nQuestion: {rec['question']}?\nAnswer:", choices=["no", "yes"],
                           gold=[int(label)]))
        return out

    train = root / "train.jsonl"
    return [Subject(name="boolq", description="", shots=docs(train) if train.is_file() else [], docs=docs(path))]


def _split_file(name: str, docs: list[Doc], shots: int) -> Subject:
    """Tasks without a dev split: the first `shots` documents are the examples, the rest are scored."""
    if shots >= len(docs):
        raise GraphllmError(f"--shots {shots}: {name} has only {len(docs)} examples, none would be left to score")
    return Subject(name=name, description="", shots=docs[:shots], docs=docs[shots:])


def load_bbh(data: Path, shots: int = 0) -> list[Subject]:
    """BIG-Bench Hard: one `<task>.json` per task holding {"examples": [{"input", "target"}]}."""
    root = require_dir(data, "BBH folder of <task>.json files")
    files = sorted(root.glob("*.json"))
    if not files:
        raise GraphllmError(f"--data {root}: no <task>.json files; BBH's bbh/ folder holds one per task")
    subjects = []
    for f in files:
        obj = read_json(f)
        check_keys(obj, ["examples"], str(f))
        docs = []
        for i, ex in enumerate(obj["examples"]):
            check_keys(ex, ["input", "target"], f"{f} examples[{i}]")
            docs.append(Doc(query=f"Q: {ex['input']}\nA:", target=str(ex["target"])))
        subjects.append(_split_file(f.stem, docs, shots))
    return subjects


def agieval_query(rec: dict, name: str) -> str:
    """AGIEval's own zero-shot prompt (microsoft/AGIEval dataset_loader), as the harness's `query` field holds it."""
    passage = rec.get("passage") or ""
    options = rec["options"]
    last = LETTERS[(len(options) if len(options) > 1 else 5 if name in AGIEVAL_ENGLISH else 4) - 1]
    if name in AGIEVAL_ENGLISH:
        return (f"{passage}Q: {rec['question']} Answer Choices: {' '.join(options)}\n"
                f"A: Among A through {last}, the answer is")
    return f"{passage}问题：{rec['question']} 选项：{' '.join(options)}\n答案：从A到{last}, 我们应选择"


def load_agieval(data: Path, shots: int = 0) -> list[Subject]:
    """AGIEval's `data/v1/<dataset>.jsonl`; cloze datasets (no options: math, gaokao-mathcloze) are skipped."""
    root = require_dir(data, "AGIEval folder of <dataset>.jsonl files (data/v1)")
    files = sorted(root.glob("*.jsonl"))
    if not files:
        raise GraphllmError(f"--data {root}: no <dataset>.jsonl files; AGIEval's data/v1 folder holds them")
    subjects = []
    for f in files:
        records = read_jsonl(f, required=("question", "label"))
        if not records or not records[0].get("options"):
            logger.warning("agieval: %s has no options (a cloze dataset); skipped: only choice datasets are scored", f.name)
            continue
        docs = []
        for i, rec in enumerate(records, start=1):
            check_keys(rec, ["options"], f"{f}:{i}")
            n = len(rec["options"])
            labels = rec["label"] if isinstance(rec["label"], list) else [rec["label"]]
            gold = [_letter_index(str(x), n, f"{f}:{i}") for x in labels]
            docs.append(Doc(query=agieval_query(rec, f.stem), choices=list(rec["options"]), gold=gold))
        subjects.append(_split_file(f.stem, docs, shots))
    if not subjects:
        raise GraphllmError(f"--data {root}: every dataset there is a cloze one; graphllm scores AGIEval's choice datasets")
    return subjects


CHOICE_TASKS = ("mmlu", "ceval", "boolq", "agieval")
GENERATION_TASKS = ("bbh",)
TASKS = CHOICE_TASKS + GENERATION_TASKS + ("humaneval",)
DEFAULT_SPLIT = {"mmlu": "test", "ceval": "val", "boolq": "val"}


def load_task(task: str, data: Path, *, shots: int, split: str | None = None) -> list[Subject]:
    """The subjects of `task` read from `data` (HumanEval has its own loader, graphllm.eval.humaneval)."""
    if task in ("bbh", "agieval"):
        return (load_bbh if task == "bbh" else load_agieval)(data, shots)
    loaders = {"mmlu": load_mmlu, "ceval": load_ceval, "boolq": load_boolq}
    if task not in loaders:
        raise GraphllmError(f"--task {task}: not one of {', '.join(TASKS)}")
    return loaders[task](data, split or DEFAULT_SPLIT[task])
