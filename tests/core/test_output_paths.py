"""Output paths are checked before any work (planner/output_paths.py): a folder where a file goes, a
parent that is a file, or an existing file without --force is a SpecError naming the flag, and what
was there is left as it was."""

import pytest

from planner.cli import main
from planner.errors import SpecError
from planner.output_paths import check_output_file, check_output_folder

TINY = ["--model", "gpt-tiny", "--cluster", "cpu-local", "--global-batch", "8", "--no-progress"]


def refused(capsys, argv, flag, *, cli=main):
    """Run ``argv``: exit code 2, one line naming ``flag``, no traceback; returns stderr."""
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {flag}: " in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "p.json"
    assert main(["plan", *TINY, "-o", str(path)]) == 0
    return path


# -- the helper -----------------------------------------------------------------------------------

def test_file_new_existing_and_forced(tmp_path):
    assert check_output_file("--x", tmp_path / "new" / "a.json", force=False) == tmp_path / "new" / "a.json"
    (tmp_path / "a.json").write_text("keep")
    with pytest.raises(SpecError, match="the file exists; pass --force") as err:
        check_output_file("--x", tmp_path / "a.json", force=False)
    assert err.value.field == "--x"
    assert check_output_file("--x", tmp_path / "a.json", force=True) == tmp_path / "a.json"


@pytest.mark.parametrize("force", [False, True])
def test_file_refuses_a_folder_and_a_file_parent(tmp_path, force):
    (tmp_path / "f.json").write_text("keep")
    with pytest.raises(SpecError, match="it is a folder; give a file path"):
        check_output_file("--x", tmp_path, force=force)
    with pytest.raises(SpecError, match="it is a folder"):
        check_output_file("--x", f"{tmp_path}/new/", force=force)
    for below in ("f.json/p.json", "f.json/a/b.json"):
        with pytest.raises(SpecError, match=f"its parent {tmp_path / 'f.json'} is a file"):
            check_output_file("--x", tmp_path / below, force=force)


def test_file_suffixes(tmp_path):
    formats = (".png", ".pdf", ".svg")
    assert check_output_file("--x", tmp_path / "tl", force=False, suffixes=formats) == tmp_path / "tl.png"
    assert check_output_file("--x", tmp_path / "tl.PDF", force=False, suffixes=formats) == tmp_path / "tl.PDF"
    with pytest.raises(SpecError, match=r"cannot write \.xyz files; end the name with one of \.png, \.pdf, \.svg"):
        check_output_file("--x", tmp_path / "tl.xyz", force=False, suffixes=formats)
    (tmp_path / "tl.png").write_text("keep")
    with pytest.raises(SpecError, match="the file exists") as err:
        check_output_file("--x", tmp_path / "tl", force=False, suffixes=formats)
    assert err.value.value == str(tmp_path / "tl.png")  # the name really written


def test_folder(tmp_path):
    (tmp_path / "f.json").write_text("keep")
    assert check_output_folder("--x", tmp_path / "new" / "d", force=False) == tmp_path / "new" / "d"
    for force in (False, True):
        with pytest.raises(SpecError, match="it is a file; give a folder path"):
            check_output_folder("--x", tmp_path / "f.json", force=force)
        with pytest.raises(SpecError, match="its parent .* is a file"):
            check_output_folder("--x", tmp_path / "f.json" / "d", force=force)
    (tmp_path / "empty").mkdir()
    assert check_output_folder("--x", tmp_path / "empty", force=False) == tmp_path / "empty"
    with pytest.raises(SpecError, match="the folder is not empty; pass --force"):
        check_output_folder("--x", tmp_path, force=False)
    with pytest.raises(SpecError, match="use --resume"):
        check_output_folder("--x", tmp_path, force=False, exists_fix="use --resume")
    assert check_output_folder("--x", tmp_path, force=True) == tmp_path


def test_folder_with_named_files(tmp_path):
    (tmp_path / "a.txt").write_text("keep")
    (tmp_path / "sub").mkdir()
    assert check_output_folder("--x", tmp_path, force=False, files=["b.txt"]) == tmp_path  # other files stay
    with pytest.raises(SpecError, match="a.txt exist there; pass --force"):
        check_output_folder("--x", tmp_path, force=False, files=["a.txt", "b.txt"])
    assert check_output_folder("--x", tmp_path, force=True, files=["a.txt"]) == tmp_path
    with pytest.raises(SpecError, match="sub is a folder there"):
        check_output_folder("--x", tmp_path, force=True, files=["sub"])


# -- the planner's commands -----------------------------------------------------------------------

@pytest.fixture
def kept(tmp_path):
    """A file the commands must not touch."""
    path = tmp_path / "keep.json"
    path.write_text('{"mine": true}')
    yield path
    assert path.read_text() == '{"mine": true}'


def test_plan_output(tmp_path, kept, capsys):
    refused(capsys, ["plan", *TINY, "-o", str(kept)], "--output")
    assert "it is a folder" in refused(capsys, ["plan", *TINY, "-o", str(tmp_path), "--force"], "--output")
    assert "its parent" in refused(capsys, ["plan", *TINY, "-o", str(kept / "p.json")], "--output")
    assert "its parent" in refused(capsys, ["evaluate", "--plan", str(kept), "-o", str(kept / "p.json")],
                                   "--output")


def test_timeline_output(plan_file, tmp_path, capsys):
    assert main(["timeline", str(plan_file), "-o", str(tmp_path / "tl")]) == 0
    assert f"timeline written to {tmp_path / 'tl.png'} " in capsys.readouterr().out
    assert (tmp_path / "tl.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "tl").exists()
    before = (tmp_path / "tl.png").read_bytes()
    assert "tl.png" in refused(capsys, ["timeline", str(plan_file), "-o", str(tmp_path / "tl")], "--output")
    assert (tmp_path / "tl.png").read_bytes() == before
    err = refused(capsys, ["timeline", str(plan_file), "-o", str(tmp_path / "tl.xyz")], "--output")
    assert ".png, .pdf, .svg" in err and not (tmp_path / "tl.xyz").exists()
    assert main(["timeline", str(plan_file), "-o", str(tmp_path / "tl.svg")]) == 0
    assert (tmp_path / "tl.svg").read_text().lstrip().startswith("<?xml")


def test_export_and_report_output(plan_file, kept, capsys):
    assert "it is a file" in refused(capsys, ["export", str(plan_file), "--to", "megatron", "-o", str(kept)],
                                     "--output")
    refused(capsys, ["export", str(plan_file), "--to", "megatron", "-o", str(kept / "sub")], "--output")
    assert "it is a file" in refused(capsys, ["report", str(plan_file), "-o", str(kept)], "--output")
    refused(capsys, ["report", str(plan_file), "--html", "-o", str(kept)], "--output")


def test_validate_csv_is_checked_before_pricing(tmp_path, kept, capsys, monkeypatch):
    import planner.validation.price as price

    def no_pricing(*a, **k):
        raise AssertionError("priced before checking --csv")

    monkeypatch.setattr(price, "validate_cases", no_pricing)
    assert "--force" in refused(capsys, ["validate", "--csv", str(kept)], "--csv")
    refused(capsys, ["validate", "--csv", str(tmp_path), "--force"], "--csv")


def test_profile_cluster_output_is_checked_before_measuring(tmp_path, kept, capsys, monkeypatch):
    import subprocess

    def no_run(*a, **k):
        raise AssertionError("measured before checking -o")

    monkeypatch.setattr(subprocess, "run", no_run)
    refused(capsys, ["profile-cluster", "-o", str(tmp_path), "--force"], "--output")
    refused(capsys, ["profile-cluster", "-o", str(kept)], "--output")


# -- python -m runtime run: refused before any worker starts --------------------------------------

@pytest.fixture
def no_workers(monkeypatch):
    import runtime.launch

    def no_start(*a, **k):
        raise AssertionError("a worker started before the output paths were checked")

    monkeypatch.setattr(runtime.launch, "run_local", no_start)
    monkeypatch.setattr(runtime.launch, "run_worker", no_start)
    from runtime.cli import main as runtime_main

    return runtime_main


def test_runtime_out(plan_file, tmp_path, kept, capsys, no_workers):
    run = ["run", str(plan_file), "--steps", "1"]
    plan_text = plan_file.read_text()
    assert "--force" in refused(capsys, [*run, "--out", str(kept)], "--out", cli=no_workers)
    assert "plan file being run" in refused(capsys, [*run, "--out", str(plan_file), "--force"], "--out",
                                            cli=no_workers)
    assert plan_file.read_text() == plan_text
    refused(capsys, [*run, "--out", str(tmp_path), "--force"], "--out", cli=no_workers)
    refused(capsys, [*run, "--out", str(kept / "m.json")], "--out", cli=no_workers)


def test_runtime_checkpoint_dir(plan_file, tmp_path, kept, capsys, no_workers):
    run = ["run", str(plan_file), "--steps", "1", "--checkpoint-every", "1"]
    refused(capsys, [*run, "--checkpoint-dir", str(kept)], "--checkpoint-dir", cli=no_workers)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "step-000001").mkdir()
    assert "--resume" in refused(capsys, [*run, "--checkpoint-dir", str(tmp_path / "ck")], "--checkpoint-dir",
                                 cli=no_workers)


def test_runtime_resume_and_force_accept_a_folder_with_checkpoints(plan_file, tmp_path):
    from runtime.cli import build_parser, check_arguments

    (tmp_path / "ck" / "step-000001").mkdir(parents=True)
    for extra in (["--resume"], ["--force"]):
        args, unknown = build_parser().parse_known_args(["run", str(plan_file), "--checkpoint-dir",
                                                         str(tmp_path / "ck"), *extra])
        check_arguments(args, unknown, options=[])
