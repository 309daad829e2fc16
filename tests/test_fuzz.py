"""Fuzzed input: recipes, dataset YAMLs and data files mutated from the shipped ones never give a traceback.

Every case drives the real command line (`finetune.cli.main`, in this process) and must end in exit status 0 or 2;
on 2, stderr is one line `finetune: error: ...` naming the recipe, dataset YAML or data file (and the key or row where
the mutation makes that certain). Hypothesis draws the mutations (derandomized: the same cases on every run, so the
suite's time is fixed): wrong types, unknown keys, deleted keys, NaN and infinite numbers, huge and empty values,
NUL bytes and unpaired surrogates, YAML's bare yes/no, broken YAML and JSON, invalid UTF-8, empty files, bad roles.

Cost: recipe parsing is ~20 ms a case and data loading ~30 ms, so those run hundreds of cases with the verb's heavy
part replaced (the model build for recipes; for data, everything but the stage's own data preparation). Only a few
cases run the whole `validate` (tiny model, trainer built) or `train` against an existing run folder, which must come
out byte for byte unchanged.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import CONVERSATIONS, REPO, tiny_recipe, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune import cli

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)
# Recipes whose data the fuzzed data cases read with SmolLM2's tokenizer (the others name hub models' templates).
DATA_RECIPES = [p for p in RECIPES if p.parent.name in ("smollm2-135m", "tiny")]
DATASET_YAMLS = sorted(p for p in (REPO / "datasets_cfg").glob("*.yaml") if "files" in yaml.safe_load(p.read_text()))
ROWS_PER_FILE = 6

SETTINGS = dict(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
HUGE = "x" * 100_000
# Values a careless edit, a script or a hostile file puts where a setting was.
ODD_VALUES = [None, "", HUGE, [], {}, [None], {"a": {"b": 1}}, True, False, "no", "yes", "off", 0, -1, 10**30,
              2**64, 1.5, -0.0, float("nan"), float("inf"), -float("inf"), "\x00", "a\x00b", "\ud800", "nan", "1e999",
              "a,b", "embedded:nope", "/nonexistent/x", "\u00ff", "../../etc/passwd", "x" * 300]
POISON = [float("nan"), float("inf"), -float("inf"), "\x00", "a\x00b", "\ud800"]
values = st.one_of(st.sampled_from(ODD_VALUES), st.sampled_from(POISON), st.none(), st.booleans(), st.integers(),
                   st.floats(), st.text(max_size=8), st.lists(st.integers(), max_size=2))
UNKNOWN_KEYS = ["zz_unknown", "learnig_rate", 1, "", "a.b", "x" * 300, "\x00", "\u00ff", "max lenght"]
JUNK = [b"\xff\xfe", b"\x00", b"[", b"{", b": :", b"\t", b"&a [*a]", b"!!python/object/apply:os.system ['x']",
        b"'", b"\x80", b"\xc3", b"---\n- a\n", b"%YAML 9\n", b"? [a]\n"]
BAD_UTF8 = [b"\xff", b"\x80", b"\xc3(", b"\xed\xa0\x80"]


def _is_poison(value) -> bool:
    """A value no setting may take: a NaN or infinite number, a NUL character, an unpaired surrogate."""
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, str) and ("\x00" in value or "\ud800" in value)


def _at(tree, path):
    """The node of a nested mapping/list at a path of keys and indexes."""
    for k in path:
        tree = tree[k]
    return tree


def _paths(node, prefix=()):
    """Every (path, value) inside parsed YAML; a path is a tuple of mapping keys and list indexes."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield (*prefix, key), value
        yield from _paths(value, (*prefix, key))


# Settings whose value is a free-form mapping: any key is valid in them, and errors name the setting.
def _free_form(key) -> bool:
    return key in ("files", "hub_splits", "columns") or str(key).endswith("kwargs")


def _dotted(path) -> str:
    """How error messages spell a path: data.datasets[0].name; up to a plain list (adapter.target_modules for its
    items) or a free-form mapping (files for files.train)."""
    out = ""
    for i, key in enumerate(path):
        if isinstance(key, int):
            if i + 1 == len(path):
                break
            out += f"[{key}]"
        else:
            out += f".{key}" if out else str(key)
            if _free_form(key):
                break
    return out


def _mutate_tree(draw, data):
    """One structural mutation of parsed YAML. Returns (what was done, the key the error must name or None)."""
    paths = list(_paths(data))
    kind = draw(st.sampled_from(["set", "set", "set", "unknown", "delete"]) if paths else st.just("unknown"))
    if kind == "unknown":
        holders = [()] + [p for p, v in paths if isinstance(v, dict)]
        where = draw(st.sampled_from(holders))
        key = draw(st.sampled_from(UNKNOWN_KEYS))
        node = _at(data, where)
        node[key] = 1
        free = any(_free_form(k) for k in where)
        return f"unknown key {key!r:.40} at {where}", None if free else ("unknown", where, key)
    path, old = draw(st.sampled_from(paths))
    node = _at(data, path[:-1])
    if kind == "delete":
        del node[path[-1]]
        return f"deleted {path}", None
    value = copy.deepcopy(draw(values))
    node[path[-1]] = value
    # A poisoned value where a scalar setting was must be refused, naming the key (not so inside a free-form
    # mapping such as a dataset YAML's `columns`, or where the value is a whole list of names).
    named = ("key", path) if _is_poison(value) and not isinstance(old, (dict, list)) and not any(
        str(k).endswith("kwargs") for k in path) else None
    return f"set {path} = {value!r:.60}", named


def _mutate_bytes(draw, raw: bytes):
    """One byte-level mutation of a YAML file: junk inserted, truncated, or a byte that is not UTF-8."""
    kind = draw(st.sampled_from(["junk", "truncate", "utf8"]))
    at = draw(st.integers(0, len(raw)))
    if kind == "junk":
        junk = draw(st.sampled_from(JUNK))
        return raw[:at] + junk + raw[at:], f"inserted {junk!r} at byte {at}", None
    if kind == "truncate":
        return raw[:at], f"truncated at byte {at}", None
    bad = draw(st.sampled_from(BAD_UTF8))
    return raw[:at] + bad + raw[at:], f"inserted {bad!r} at byte {at}", ("utf8",)


@st.composite
def yaml_cases(draw, sources):
    """A mutated copy of one YAML file: (source, new bytes, what was done, what the error must name)."""
    source = draw(st.sampled_from(sources))
    raw = source.read_bytes()
    if draw(st.integers(0, 3)) == 0:
        return (source, *_mutate_bytes(draw, raw))
    data = yaml.safe_load(raw)
    what, must = _mutate_tree(draw, data)
    # Default flow style keeps huge values on one line; allow_unicode=False writes surrogates as \ud800 escapes.
    return source, yaml.safe_dump(data, sort_keys=False).encode(), what, must


class Outcomes:
    """Checks each case's exit status and stderr; collects what went wrong (all cases run, then one assertion)."""

    def __init__(self, name: str):
        self.name, self.ran, self.failed = name, 0, []

    def check(self, code: int, err: str, what: str, names: list[str], must=None) -> None:
        self.ran += 1
        # Progress bars and library warnings may come first; the error is the last line, and the only one.
        lines = [line for line in err.strip().splitlines() if line.startswith("finetune:")]
        problem = None
        if "Traceback" in err or code not in (0, 2):
            problem = f"exit {code}: {err.strip()[-300:]}"
        elif code == 2 and (len(lines) != 1 or not err.strip().endswith(lines[0])):
            problem = f"{len(lines)} finetune lines on stderr, or not last: {err.strip()[-300:]}"
        elif code == 2 and not lines[0].startswith("finetune: error: "):
            problem = f"not a finetune error line: {lines[0][:300]}"
        elif code == 2 and len(lines[0]) > 6000:
            problem = f"a {len(lines[0])}-character error line"
        elif code == 2 and not any(n in lines[0] for n in names):
            problem = f"names none of {names}: {lines[0][:300]}"
        elif must is not None:
            problem = self._must(code, lines, must)
        if problem:
            self.failed.append(f"{what}: {problem}")

    @staticmethod
    def _must(code, lines, must):
        """must: ("fail",) exit 2; ("key", path), ("unknown", where, key), ("utf8",), ("row", n): exit 2 naming it."""
        if code != 2:
            return f"accepted (exit {code}); expected exit 2 ({must[0]} {must[1:]!r:.60})"
        if must[0] == "key" and _dotted(must[1]) not in lines[0]:
            return f"does not name the key {_dotted(must[1])}: {lines[0][:300]}"
        if must[0] == "unknown" and "unknown key" not in lines[0]:
            return f"does not report the unknown key {must[2]!r:.40}: {lines[0][:300]}"
        if must[0] == "utf8" and "UTF-8" not in lines[0]:
            return f"does not say the file is not UTF-8: {lines[0][:300]}"
        if must[0] == "row" and f"row {must[1]}" not in lines[0]:
            return f"does not name row {must[1]}: {lines[0][:300]}"
        return None

    def assert_clean(self) -> None:
        print(f"fuzz {self.name}: {self.ran} cases, {len(self.failed)} failed")
        assert not self.failed, f"{len(self.failed)} of {self.ran} cases failed:\n" + "\n".join(self.failed[:30])


def _run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(argv)
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- recipes


def test_fuzzed_recipes_exit_2_with_one_line_naming_file_and_key(tmp_path, monkeypatch, capsys):
    """`finetune validate` on mutated shipped recipes, the model build replaced by a no-op (parsing is the target)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("finetune.validate.main", lambda recipe: None)
    outcomes = Outcomes("recipes")

    @settings(max_examples=200, **SETTINGS)
    @given(yaml_cases(RECIPES))
    def case(drawn):
        source, raw, what, must = drawn
        path = tmp_path / source.name
        path.write_bytes(raw)
        code, err = _run(["validate", str(path)], capsys)
        outcomes.check(code, err, f"{source.relative_to(REPO)}: {what}", [str(path)], must)

    case()
    outcomes.assert_clean()


@pytest.mark.parametrize("key, value", [
    ("eval_strategy", "no"), ("save_strategy", "no"), ("logging_strategy", "no"), ("eval_strategy", "'no'"),
])
def test_yaml_bare_no_is_the_strategy_no(tmp_path, key, value):
    """TRL's documentation writes `eval_strategy: no`; YAML 1.1 reads a bare no as false, which means "no" here."""
    from finetune.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"output_dir: runs/x\ndata: {{datasets: [json_extract]}}\ntrain:\n  {key}: {value}\n")
    assert load_recipe(path).train.args[key] == "no"
    assert load_recipe(path.with_name("r.yaml"), [f"train.{key}=no"]).train.args[key] == "no"


def test_yaml_booleans_where_text_is_expected_say_to_quote(tmp_path):
    from finetune.errors import FinetuneError
    from finetune.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("output_dir: runs/x\ndata: {datasets: [json_extract]}\ntrain: {run_name: off}\n")
    with pytest.raises(FinetuneError, match=r"train.run_name = False is invalid: .* \(YAML reads .* quote the word"):
        load_recipe(path)
    path.write_text("output_dir: runs/x\ndata: {datasets: [json_extract]}\ntrain: {eval_strategy: yes}\n")
    with pytest.raises(FinetuneError, match=r"expected one of no, steps, epoch \(YAML reads an unquoted yes/no"):
        load_recipe(path)


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    """The shipped dataset YAMLs, each split cut to its first rows (a registry under FINETUNE_DATASETS)."""
    root = tmp_path_factory.mktemp("datasets_cfg")
    for spec_path in DATASET_YAMLS:
        spec = yaml.safe_load(spec_path.read_text())
        (root / spec_path.stem).mkdir()
        for split, name in spec["files"].items():
            with open(spec_path.parent / name, "rb") as f:
                head = b"".join(line for _, line in zip(range(ROWS_PER_FILE), f))
            (root / spec_path.stem / Path(name).name).write_bytes(head)
            spec["files"][split] = f"{spec_path.stem}/{Path(name).name}"
        (root / spec_path.name).write_text(yaml.safe_dump(spec, sort_keys=False))
    return root


def _data_files(registry: Path, recipe_path: Path) -> list[tuple[Path, str]]:
    """The (data file, dataset YAML) pairs a recipe reads."""
    recipe = yaml.safe_load(recipe_path.read_text())
    out = []
    for ref in [*recipe["data"].get("datasets", []), *recipe["data"].get("eval_datasets", [])]:
        ref = {"name": ref} if isinstance(ref, str) else ref
        spec_path = registry / f"{ref['name']}.yaml"
        split = ref.get("split", "train")
        out.append((registry / yaml.safe_load(spec_path.read_text())["files"][split], spec_path.name))
    return out


def _row_mutation(draw, lines: list[bytes]):
    """One row or line of a JSONL file changed. Returns (lines, what, the row an error must name or None)."""
    i = draw(st.integers(0, len(lines) - 1))
    row = json.loads(lines[i])
    kind = draw(st.sampled_from(["set", "set", "delete", "role", "row", "line", "line"]))
    if kind == "line":
        bad = draw(st.sampled_from([b"\xff\xfe{}", b'{"messages": [', b"\x00", b"[1, 2]", b"NaN", b"null", b"{}x",
                                    lines[i][:-1] + b"\x80", b'"just text"']))
        lines[i] = bad + b"\n"
        # Each is malformed in any format: the strict default stops at it, naming its line.
        return lines, f"line {i + 1} = {bad[:40]!r}", ("row", i + 1)
    if kind == "row":
        lines[i] = json.dumps(draw(st.sampled_from([None, [], 5, "text", [1, {}]]))).encode() + b"\n"
        return lines, f"row {i + 1} replaced by {lines[i][:30]!r}", ("row", i + 1)
    if kind == "role":
        paths = [p for p, v in _paths(row) if p[-1] in ("role", "from")]
        if paths:
            path = draw(st.sampled_from(paths))
            node = _at(row, path[:-1])
            node[path[-1]] = draw(st.sampled_from(["bot", "", "ASSISTANT", None, 3]))
            lines[i] = json.dumps(row).encode() + b"\n"
            return lines, f"row {i + 1}: {path} = {node[path[-1]]!r}", ("row", i + 1)
    paths = list(_paths(row))
    path, _ = draw(st.sampled_from(paths))
    node = _at(row, path[:-1])
    if kind == "delete":
        del node[path[-1]]
    else:
        node[path[-1]] = copy.deepcopy(draw(values))
    # NaN and Infinity are written as JSON's non-standard literals, which Python's reader accepts.
    lines[i] = json.dumps(row, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass") + b"\n"
    return lines, f"row {i + 1}: {kind} {path}", None


@st.composite
def data_cases(draw, registry):
    """A shipped recipe, and one of its dataset YAMLs or data files mutated. Returns (recipe, {path: new bytes}, what,
    names an error may give, what it must name)."""
    recipe = draw(st.sampled_from(DATA_RECIPES))
    data_file, spec_name = draw(st.sampled_from(_data_files(registry, recipe)))
    spec_path = registry / spec_name
    target = draw(st.sampled_from(["rows", "rows", "rows", "file", "spec"]))
    if target == "spec":
        _, raw, what, must = draw(yaml_cases([spec_path]))
        return recipe, {spec_path: raw}, f"{spec_name}: {what}", [str(spec_path), str(data_file)], must
    if target == "file":
        kind = draw(st.sampled_from(["empty", "blank", "bom", "huge", "no-newline"]))
        raw = data_file.read_bytes()
        raw = {"empty": b"", "blank": b"\n \n", "bom": b"\xef\xbb\xbf" + raw, "no-newline": raw.rstrip(b"\n"),
               "huge": raw + json.dumps({"messages": [{"role": "user", "content": HUGE * 10},
                                                      {"role": "assistant", "content": HUGE}]}).encode() + b"\n"}[kind]
        must = ("fail",) if kind in ("empty", "blank") else None
        return recipe, {data_file: raw}, f"{data_file.name}: {kind}", [str(data_file)], must
    lines, what, must = _row_mutation(draw, data_file.read_bytes().splitlines(keepends=True))
    return recipe, {data_file: b"".join(lines)}, f"{data_file.name}: {what}", [str(data_file)], must


def test_fuzzed_data_exit_2_with_one_line_naming_file_and_row(registry, tmp_path, monkeypatch, capsys, smol_tokenizer):
    """`finetune validate` on shipped recipes whose dataset YAML or data file is mutated; the verb runs the stage's
    own data preparation (read, check, convert, tokenize, cache) with SmolLM2's tokenizer, not the model build."""
    from finetune import stages, templates

    chats = {}

    def prepare_only(recipe):
        key = (recipe.data.chat_template, recipe.data.assistant_only_loss)
        if key not in chats:
            chats[key] = templates.resolve(smol_tokenizer, *key)
        return stages.get(recipe.train.stage).prepare(recipe, smol_tokenizer, chats[key], recipe.seed)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FINETUNE_DATASETS", str(registry))
    monkeypatch.setattr("finetune.validate.main", prepare_only)
    originals = {p: p.read_bytes() for p in registry.rglob("*") if p.is_file()}
    outcomes = Outcomes("data")

    @settings(max_examples=150, **SETTINGS)
    @given(data_cases(registry))
    def case(drawn):
        recipe, changes, what, names, must = drawn
        try:
            for path, raw in changes.items():
                path.write_bytes(raw)
            code, err = _run(["validate", str(recipe), f"data.cache_dir={tmp_path / 'cache'}",
                              f"output_dir={tmp_path / 'run'}"], capsys)
        finally:
            for path in changes:
                path.write_bytes(originals[path])
        outcomes.check(code, err, f"{recipe.relative_to(REPO)}, {what}", names, must)

    case()
    outcomes.assert_clean()


# ----------------------------------------------------------------------------- whole validate and train


def _recipe_yaml(tmp_path, model_dir, data_file, **sections) -> Path:
    recipe = tiny_recipe(tmp_path, model_dir, data_file, **sections).to_dict()
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def previous_run(tiny_llama, tmp_path_factory) -> Path:
    """A completed run folder (two steps on the tiny model)."""
    root = tmp_path_factory.mktemp("previous")
    data = write_jsonl(root / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS] * 2)
    path = _recipe_yaml(root, tiny_llama, data, train={"max_steps": 2, "save_steps": 1})
    assert cli.main(["train", str(path)]) == 0
    return root / "run"


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))} | {".": (None, folder.stat().st_mtime_ns)}


BROKEN_ROWS = [b"\xff\xfe{}", b'{"messages": [', b'{"messages": [{"role": "bot", "content": "x"}]}', b"[1, 2]",
               b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": NaN}]}',
               b'{"messages": 5}', b'{"messages": [{"role": "user", "content": "a\\u0000"}]}']


@st.composite
def broken_runs(draw):
    """A tiny recipe made to fail: a broken row in its data, or a poisoned value in the recipe."""
    if draw(st.booleans()):
        return "row", draw(st.sampled_from(BROKEN_ROWS)), []
    key, value = draw(st.sampled_from([("adapter.dropout", ".nan"), ("train.learning_rate", ".inf"),
                                       ("data.max_length", "0"), ("seed", "-1"), ("adapter.target_modules", "[]"),
                                       ("train.eval_strategy", "maybe"), ("data.datasets", '[{name: "a\\0b"}]'),
                                       ("adapter.r", "1e999"), ("model.name", '"\\ud800"'),
                                       ("data.max_length", str(2**40)), ("train.per_device_train_batch_size", "0")]))
    return "recipe", None, [f"{key}={value}"]


def test_fuzzed_validate_and_train_leave_a_previous_run_untouched(previous_run, tiny_llama, tmp_path, monkeypatch,
                                                                  capsys):
    """The whole `validate`, and `train` into an existing run folder (with overwrite=true, whose replacing waits for
    the model and data to load), on broken rows and poisoned recipe values: exit 2, one line, the run unchanged."""
    monkeypatch.chdir(tmp_path)
    before = _snapshot(previous_run)
    rows = [json.dumps({"messages": c}).encode() + b"\n" for c in CONVERSATIONS] * 2
    outcomes = Outcomes("validate/train")

    @settings(max_examples=12, **SETTINGS)
    @given(broken_runs(), st.sampled_from(["validate", "train", "train-overwrite"]), st.integers(0, len(rows) - 1))
    def case(broken, verb, at):
        kind, bad_row, overrides = broken
        data = tmp_path / "data.jsonl"
        data.write_bytes(b"".join(rows[:at] + [bad_row + b"\n"] + rows[at + 1:]) if kind == "row" else b"".join(rows))
        path = _recipe_yaml(tmp_path, tiny_llama, data)
        argv = [verb.split("-")[0], str(path), *overrides, f"output_dir={previous_run}"]
        if verb == "train-overwrite":
            argv.append("overwrite=true")
        code, err = _run(argv, capsys)
        names = [str(data)] if kind == "row" else [str(path)]
        if verb == "train":  # refused before anything loads: the run folder exists
            names.append(str(previous_run))
        what = f"{verb} {bad_row!r:.50}" if kind == "row" else f"{verb} {overrides}"
        outcomes.check(code, err, what, names, ("row", at + 1) if kind == "row" and verb != "train" else ("fail",))
        if _snapshot(previous_run) != before:
            outcomes.failed.append(f"{what}: the run folder {previous_run} changed")

    case()
    outcomes.assert_clean()


@pytest.mark.parametrize("override, key", [("architecture.layers=100000000", "architecture"),
                                           ("architecture.hidden_size=1000000000", "architecture"),
                                           ("architecture.intermediate_size=100000000000", "architecture")])
def test_a_scratch_model_too_big_for_memory_is_refused_before_allocating(registry, tmp_path, monkeypatch, capsys,
                                                                         override, key):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FINETUNE_DATASETS", str(registry))
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    code, err = _run(["validate", str(REPO / "recipes/tiny/pretrain.yaml"), override, "data.eval_datasets=[]",
                      f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"the {key} section describes a model of" in err and "GiB of memory" in err
