"""The command line end to end on a small teacher, plus its error handling."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from concepts.datasets import CLASSES
from surrogate.cli import main

METRIC_KEYS = {"kind", "classes", "concepts", "layer", "temperature", "n_train", "n_test", "fidelity", "fidelity_ci",
               "hard_label_fidelity", "ceiling_fidelity", "kl", "depth", "n_leaves", "n_nonzero"}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def probes_dir(teacher_files, zoo_dir, workdir):
    out = workdir / "probes"
    code = main(["probe", "--teacher", str(teacher_files["pt2"]), "--layer", "layer3,layer4", "--concepts",
                 str(zoo_dir / "concepts" / "images.csv"), "--random-runs", "3", "--out", str(out), "--quiet"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def models(teacher_files, zoo_dir, workdir, probes_dir):
    dirs = {}
    for kind, extra in (("tree", ["--max-depth", "3", "--use-concepts", "all"]), ("linear", ["--temperature", "auto", "--use-concepts", "fur,horns,stripes,watermark"])):
        dirs[kind] = workdir / f"model-{kind}"
        code = main(["distill", "--teacher", str(teacher_files["pt2"]), "--probes", str(probes_dir), "--images",
                     str(zoo_dir / "images"), "--kind", kind, *extra, "--out", str(dirs[kind]), "--quiet"])
        assert code == 0
    return dirs


def test_probe_writes_quality_table(probes_dir):
    q = pd.read_csv(probes_dir / "quality.csv")
    assert list(q.columns)[:9] == ["concept", "layer", "auc", "accuracy", "n_pos", "n_neg", "tcav_score", "p_value",
                                   "significant"]  # the contract's columns first; the probe's own test after them
    assert (q["p_value"] == q["probe_p_value"]).all()  # without --target, p_value is the probe's test
    assert set(q["layer"]) == {"layer3", "layer4"} and "fur" in set(q["concept"])
    assert q["tcav_score"].isna().all()  # no --target
    assert q["auc"].between(0, 1).all()


def test_probe_with_target_adds_tcav(capsys, teacher_files, zoo_dir, workdir):
    out = workdir / "probes-target"
    code, _, err = run(capsys, "probe", "--teacher", teacher_files["pt2"], "--layer", "layer4", "--concepts",
                       zoo_dir / "tcav", "--random-runs", "3", "--target", "cat", "--images", zoo_dir / "images" / "cat",
                       "--out", out, "--quiet")
    assert code == 0, err
    q = pd.read_csv(out / "quality.csv")
    assert q["tcav_score"].between(0, 1).all() and q["p_value"].between(0, 1).all()


def test_score_writes_concept_scores(capsys, probes_dir, zoo_dir, workdir):
    code, out, err = run(capsys, "score", probes_dir, "--images", zoo_dir / "images", "--out", workdir / "s.csv", "--quiet")
    assert code == 0, err
    assert out == ""  # a file was asked for: stdout stays empty
    s = pd.read_csv(workdir / "s.csv")
    assert s.columns[0] == "path" and len(s) == 200 and s.drop(columns="path").stack().between(0, 1).all()


def test_distill_outputs(models):
    for kind, d in models.items():
        m = json.loads((d / "metrics.json").read_text())
        assert METRIC_KEYS <= set(m)
        assert m["kind"] == kind and m["classes"] == list(CLASSES)
        assert 0 <= m["fidelity"] <= 1 and m["fidelity_ci"][0] <= m["fidelity"] <= m["fidelity_ci"][1]
        assert set(m["concepts"]) | set(m["excluded_concepts"]) == set(pd.read_csv(d.parent / "probes" / "quality.csv")["concept"])
        imp = pd.read_csv(d / "importance.csv")
        assert list(imp.columns) == ["concept", "importance"]
    coef = pd.read_csv(models["linear"] / "coefficients.csv")
    assert list(coef.columns) == ["class", "concept", "weight"] and "(intercept)" in set(coef["concept"])
    assert not (models["tree"] / "coefficients.csv").exists()


def test_explain_json_is_the_only_stdout(capsys, models, zoo_dir, workdir):
    image = sorted((zoo_dir / "images" / "cat").iterdir())[0]
    for kind, d in models.items():
        png = workdir / f"explain-{kind}.png"
        code, out, err = run(capsys, "explain", d, image, "--json", "--out", png)
        assert code == 0, err
        e = json.loads(out)
        assert set(e) >= {"teacher", "surrogate", "concept_scores", "path", "contributions", "counterfactuals"}
        assert set(e["teacher"]) == {"label", "probs"} and set(e["surrogate"]) == {"label", "probs", "agrees"}
        assert abs(sum(e["surrogate"]["probs"].values()) - 1) < 1e-6
        if kind == "tree":
            assert e["path"] and set(e["path"][0]) == {"concept", "threshold", "value", "went"}
        for cf in e["counterfactuals"]:
            assert set(cf) == {"changes", "surrogate_label"}
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run(capsys, "explain", models["tree"], image)
    assert code == 0 and "teacher:" in out and "surrogate:" in out


def test_render_formats(capsys, models, zoo_dir, workdir):
    image = sorted((zoo_dir / "images" / "dog").iterdir())[0]
    for name in ("t.svg", "t.png", "t.pdf", "t.dot"):
        code, _, err = run(capsys, "render", models["tree"], "--out", workdir / name, "--highlight", image)
        assert code == 0, err
        assert (workdir / name).stat().st_size > 100
    code, _, err = run(capsys, "render", models["tree"], "--out", workdir / "thumbs.svg", "--thumbnails")
    assert code == 0, err
    svg = (workdir / "thumbs.svg").read_text()
    assert "data:image/png;base64," in svg  # thumbnails embedded, the SVG stands alone
    code, _, err = run(capsys, "render", models["linear"], "--out", workdir / "lin.png")
    assert code == 0, err
    code, _, err = run(capsys, "render", models["tree"], "--out", workdir / "t.gif")
    assert code == 2 and "expected" in err and not (workdir / "t.gif").exists()


def test_audit_report(capsys, models, zoo_dir, workdir):
    out = workdir / "audit"
    code, stdout, err = run(capsys, "audit", models["tree"], "--images", zoo_dir / "images", "--spurious", "watermark",
                            "--compare", models["linear"], "--out", out, "--quiet")
    assert code == 0, err
    assert stdout == ""
    r = json.loads((out / "report.json").read_text())
    assert {"fidelity", "ceiling_fidelity", "concepts", "per_class", "disagreements"} <= set(r)
    c = {row["concept"]: row for row in r["concepts"]}
    assert set(c["watermark"]) >= {"concept", "importance", "rank", "tcav_score", "p_value", "significant", "spurious", "flagged"}
    assert c["watermark"]["spurious"] and not c["fur"]["spurious"]
    assert sorted(row["rank"] for row in r["concepts"])[0] == 1
    assert sum(pc["n"] for pc in r["per_class"]) == 200
    html = (out / "report.html").read_text()
    assert "<svg" in html and "http://" not in html.replace("http://www.w3.org", "")  # self-contained
    assert "compare" in r


@pytest.mark.parametrize("argv, expected", [
    (["--layer", "layer3.9"], "Did you mean"),
    (["--layer", "layer3", "--concepts", "MISSING"], "no such file or folder"),
])
def test_probe_errors_are_one_line(capsys, teacher_files, zoo_dir, workdir, argv, expected):
    args = {"--teacher": str(teacher_files["pt2"]), "--layer": "layer3",
            "--concepts": str(zoo_dir / "concepts" / "images.csv"), "--out": str(workdir / "never")}
    for k, v in zip(argv[::2], argv[1::2]):
        args[k] = v if v != "MISSING" else str(workdir / "missing-folder")
    code, out, err = run(capsys, "probe", *[x for kv in args.items() for x in kv], "--quiet")
    assert code == 2
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (workdir / "never").exists()


def test_empty_concept_folder_error(capsys, teacher_files, zoo_dir, tmp_path):
    import shutil
    shutil.copytree(zoo_dir / "tcav", tmp_path / "tcav")
    for f in (tmp_path / "tcav" / "horns").iterdir():
        f.unlink()
    code, _, err = run(capsys, "probe", "--teacher", teacher_files["pt2"], "--layer", "layer3", "--concepts",
                       tmp_path / "tcav", "--out", tmp_path / "p", "--quiet")
    assert code == 2 and "horns" in err and "no images" in err and len(err.strip().splitlines()) == 1


def test_distill_errors(capsys, teacher_files, probes_dir, zoo_dir, workdir):
    code, _, err = run(capsys, "distill", "--teacher", teacher_files["pt2"], "--probes", probes_dir, "--images",
                       workdir / "no-images", "--out", workdir / "m", "--quiet")
    assert code == 2 and "no such file or folder" in err
    code, _, err = run(capsys, "distill", "--teacher", teacher_files["pt2"], "--probes", probes_dir, "--images",
                       zoo_dir / "images", "--classes", "a,b", "--out", workdir / "m", "--quiet")
    assert code == 2 and "2 names" in err and not (workdir / "m").exists()
    code, _, err = run(capsys, "distill", "--teacher", "concepts.models:toy_resnet", "--probes", probes_dir, "--images",
                       zoo_dir / "images", "--out", workdir / "m", "--quiet")
    assert code == 2 and "different teacher" in err


def test_distill_gate_when_no_probe_is_significant(capsys, teacher_files, zoo_dir, tmp_path):
    # concept labels that are pure noise: no probe beats random-vs-random probes, nothing may reach a surrogate
    table = pd.read_csv(zoo_dir / "concepts" / "images.csv")[["path", "label"]]
    rng = np.random.default_rng(0)
    for c in ("noise_a", "noise_b"):
        table[c] = rng.integers(0, 2, len(table))
    table["path"] = [str((zoo_dir / "concepts" / p).resolve()) for p in table["path"]]
    table.to_csv(tmp_path / "noise.csv", index=False)
    code, _, err = run(capsys, "probe", "--teacher", teacher_files["pt2"], "--layer", "layer4", "--concepts",
                       tmp_path / "noise.csv", "--out", tmp_path / "p", "--quiet")
    assert code == 0, err
    assert not pd.read_csv(tmp_path / "p" / "quality.csv")["significant"].any()
    code, _, err = run(capsys, "distill", "--teacher", teacher_files["pt2"], "--probes", tmp_path / "p", "--images",
                       zoo_dir / "images", "--out", tmp_path / "gated", "--quiet")
    assert code == 2 and "beats random-vs-random probes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "gated").exists()


def test_audit_unknown_spurious(capsys, models, zoo_dir, workdir):
    code, _, err = run(capsys, "audit", models["tree"], "--images", zoo_dir / "images", "--spurious", "watermarks",
                       "--out", workdir / "a2", "--quiet")
    assert code == 2 and "Did you mean 'watermark'" in err and not (workdir / "a2").exists()


def test_python_dash_m_and_no_traceback(teacher_files, zoo_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "surrogate", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "distill" in r.stdout
    r = subprocess.run([sys.executable, "-m", "surrogate", "probe", "--teacher", str(teacher_files["pt2"]), "--layer",
                        "layer9", "--concepts", str(zoo_dir / "tcav"), "--out", str(tmp_path / "p")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith("surrogate probe: error: Layer 'layer9' not found")


def test_skip_bad_images_from_the_command_line(capsys, teacher_files, zoo_dir, tmp_path):
    import shutil
    shutil.copytree(zoo_dir / "tcav", tmp_path / "tcav")
    (tmp_path / "tcav" / "horns" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    argv = ["probe", "--teacher", teacher_files["pt2"], "--layer", "layer4", "--concepts", tmp_path / "tcav",
            "--random-runs", "2", "--quiet"]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "p1")
    assert code == 2 and "broken.png" in err and len(err.strip().splitlines()) == 1
    with pytest.warns(UserWarning, match=r"--concepts: skipped 1 of .*broken.png"):
        code, _, err = run(capsys, *argv, "--skip-bad-images", "--out", tmp_path / "p2")
    assert code == 0, err
    assert (pd.read_csv(tmp_path / "p2" / "quality.csv")["n_pos"] == 12).all()
