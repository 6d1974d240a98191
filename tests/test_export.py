"""scripts/export_model.py and asarm.hub: export, model card, Hub push (to a local fake Hub), load back.

No test contacts the Hub: ``HfApi``'s repository, branch and commit calls are replaced by ``LocalHub``,
which writes what a push would put on the Hub into a Hugging Face cache directory laid out exactly as
huggingface_hub lays out downloads (``models--owner--name/{refs,snapshots,blobs}``). Loading with
HF_HUB_OFFLINE=1 then goes through ``ASARM.from_pretrained(REPO, revision=...)``, the same Hub-name path as
``therealgabeguo/ASARM``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from asarm import hub, orders
from asarm.model import ASARM, ModelLoadError
from helpers import use_hub_cache

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "export_model.py"
REPO = "someone/tiny-asarm"


def _load_script():
    spec = importlib.util.spec_from_file_location("export_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_model = _load_script()


class LocalHub:
    """What the Hub would hold after create_repo / create_branch / create_commit, written as the local
    Hugging Face cache (refs/<branch> -> commit, snapshots/<commit>/<file>, blobs/<sha256>)."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.calls: list[tuple] = []

    def folder(self, repo_id: str) -> Path:
        return self.cache / ("models--" + repo_id.replace("/", "--"))

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **_):
        self.calls.append(("create_repo", repo_id, private))
        if self.folder(repo_id).exists():
            if not exist_ok:
                raise RuntimeError(f"409 Conflict: {repo_id} already exists")
            return
        (self.folder(repo_id) / "refs").mkdir(parents=True)
        self._commit(repo_id, "main", {".gitattributes": b"*.safetensors filter=lfs\n"}, parent=None)

    def create_branch(self, repo_id, *, branch, exist_ok=False, **_):
        self.calls.append(("create_branch", repo_id, branch))
        refs = self.folder(repo_id) / "refs"
        if (refs / branch).exists():
            if not exist_ok:
                raise RuntimeError(f"409 Conflict: branch {branch} exists")
            return
        (refs / branch).write_text((refs / "main").read_text())

    def create_commit(self, repo_id, operations, *, commit_message, revision=None, **_):
        branch = revision or "main"
        self.calls.append(("create_commit", repo_id, branch, sorted(op.path_in_repo for op in operations)))
        ref = self.folder(repo_id) / "refs" / branch
        if not ref.exists():
            raise RuntimeError(f"404 Not Found: branch {branch} does not exist")
        files = {op.path_in_repo: self._content(op.path_or_fileobj) for op in operations}
        commit = self._commit(repo_id, branch, files, parent=ref.read_text())
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{commit}")

    @staticmethod
    def _content(source) -> bytes:
        return source if isinstance(source, bytes) else Path(source).read_bytes()

    def _commit(self, repo_id, branch, files: dict[str, bytes], parent: str | None) -> str:
        root = self.folder(repo_id)
        if parent is not None:  # a commit keeps the parent's files it does not replace, as git does
            old = root / "snapshots" / parent
            files = {p.name: p.read_bytes() for p in old.iterdir()} | files
        commit = hashlib.sha1(repr((parent, sorted((k, hashlib.sha256(v).hexdigest())
                                                    for k, v in files.items()))).encode()).hexdigest()
        (root / "blobs").mkdir(exist_ok=True)
        (root / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            blob = root / "blobs" / hashlib.sha256(content).hexdigest()
            blob.write_bytes(content)
            (root / "snapshots" / commit / name).symlink_to(Path("../..") / "blobs" / blob.name)
        (root / "refs" / branch).write_text(commit)
        return commit


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A reachable fake Hub backed by a fresh Hugging Face cache directory."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    fake = LocalHub(cache)
    for name in ("create_repo", "create_branch", "create_commit"):
        monkeypatch.setattr(huggingface_hub.HfApi, name,
                            lambda self, *args, _name=name, **kwargs: getattr(fake, _name)(*args, **kwargs))
    use_hub_cache(monkeypatch, cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_offline", lambda: False)  # "the Hub answered", without a request
    return fake


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir):
    """A training run directory as the trainer leaves it, around the tiny test model."""
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step_4"
    shutil.copytree(tiny_model_dir, checkpoint / "model")
    (checkpoint / "trainer_state.json").write_text('{"step": 4}')
    (run / "checkpoints" / "latest").write_text("step_4")
    config = {"data": {"source": "text", "paths": ["wikitext-2/valid.txt"], "unit": "line", "max_length": 16,
                       "batch_size": 2, "heldout_fraction": 0.05},
              "masking": {"objective": "joint", "order": "any_subset", "prompt_attn": "prompt_only",
                          "start_masking_rate": 0.5, "final_min_masking_rate": 0.5, "final_max_masking_rate": 0.99},
              "optim": {"lr": 0.0005, "warmup_steps": 1, "decay": "linear"},
              "eval": {"masking_rate": 0.9}, "train": {"seed": 0, "max_steps": 4}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    records = [{"kind": "train", "step": s, "nll_per_token": 9.0 - s} for s in range(1, 5)]
    records.append({"kind": "eval", "step": 4, "nll_per_token": 7.125, "assd_nfe": 12.0})
    # a run killed mid-write leaves half a line: the card must still read the rest
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tr')
    return run


def _logits(model: ASARM) -> torch.Tensor:
    tokens = torch.tensor([[17, 11368, 185, 9, 4, 3]])
    sigma = orders.any_subset(torch.tensor([2]), 6, generator=torch.Generator().manual_seed(0))
    return model.logits(tokens, sigma, torch.tensor([2]), torch.argsort(sigma)[:, 2:])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------- push and load

def test_push_to_a_new_branch_loads_back_offline_like_the_paper_checkpoint(tmp_path, run_dir, local_hub,
                                                                          tiny_model_dir, monkeypatch, capsys):
    dest = tmp_path / "exported"
    assert export_model.main([str(run_dir), str(dest), "--push-to-hub", REPO, "--revision", "v1",
                              "--private"]) == 0
    assert f'ASARM.from_pretrained("{REPO}", revision="v1")' in capsys.readouterr().out
    assert f"--model {REPO} --revision v1" in (dest / "README.md").read_text()
    assert local_hub.calls[0] == ("create_repo", REPO, True)
    assert local_hub.calls[1] == ("create_branch", REPO, "v1")
    pushed = local_hub.calls[2][3]
    assert {"README.md", "config.json", "model.safetensors", "asarm.json", "training_config.yaml",
            "training_log.jsonl", "tokenizer_config.json"} <= set(pushed)
    assert sorted(pushed) == sorted(p.name for p in dest.iterdir())  # the Hub gets what DEST holds

    from huggingface_hub import constants
    from asarm.model import _local_model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert _local_model_dir(REPO) is None  # a Hub name, as "therealgabeguo/ASARM" is
    loaded = ASARM.from_pretrained(REPO, revision="v1", device="cpu")
    assert loaded.mask_token_id == 6 and loaded.tokenizer is not None
    original = ASARM.from_pretrained(tiny_model_dir, device="cpu")
    assert torch.equal(_logits(loaded), _logits(original))
    assert loaded.tokenizer("Hello world")["input_ids"] == original.tokenizer("Hello world")["input_ids"]
    with pytest.raises(ModelLoadError):  # the push went to v1: main holds no model
        ASARM.from_pretrained(REPO, revision="main", device="cpu")


def test_push_an_exported_directory_as_is_to_main(tmp_path, tiny_model_dir, local_hub, capsys):
    """Without DEST an exported model directory is pushed through a temporary copy; a second push to an
    existing repository and branch does not try to create them again."""
    for _ in range(2):
        assert export_model.main([str(tiny_model_dir), "--push-to-hub", REPO]) == 0
    assert [c[0] for c in local_hub.calls] == ["create_repo", "create_commit"] * 2
    assert local_hub.calls[-1][2] == "main"
    snapshot = local_hub.folder(REPO) / "snapshots" / (local_hub.folder(REPO) / "refs" / "main").read_text()
    card = (snapshot / "README.md").read_text()
    assert card.startswith("---\n") and f'ASARM.from_pretrained("{REPO}")' in card
    assert not (tiny_model_dir / "README.md").exists()  # the source is left alone


# ------------------------------------------------------------------------------------------ model card

def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_reads_the_run_and_says_not_measured_for_missing_figures(tmp_path, run_dir):
    dest = tmp_path / "exported"
    assert export_model.main([str(run_dir), str(dest)]) == 0
    card = (dest / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0" and "asarm" in meta["tags"]
    assert hub.CARD_MARKER in card
    assert "| held-out NLL per token (the training text's held-out split, 90% masked, step 4) | 7.125 |" in card
    assert "| final training NLL per token | 5 |" in card
    assert "wikitext-2/valid.txt" in card and "joint; orders any_subset" in card
    assert "| test NLL per token (`asarm eval nll`) | not measured |" in card
    assert "ASSD (`asarm eval speculative`): NFE, tokens per round and acceptance not measured" in card


def _nll_results(path: Path) -> Path:
    metrics = {"sequences": 4, "length": 32, "masking_rate": 0.95, "targets": 120,
               "model": {"nll_per_token": 4.815, "per_sequence_ci95": [4.798, 4.832]},
               "unigram": {"nll_per_token": 6.493, "per_sequence_ci95": [6.4, 6.6]}}
    path.write_text(json.dumps({"evaluation": "nll", "args": {"text_file": None, "model": "asarm-tiny"},
                                "metrics": metrics}))
    return path


def _speculative_results(path: Path) -> Path:
    nfe = {"n": 8, "mean": 107.9, "std": 3.0, "ci95": [105.6, 110.2]}
    samplers = {"sequential": {"metrics": {"nfe": {"n": 8, "mean": 121.0, "std": 0.0, "ci95": [None, None]}},
                               "tokens_per_round_pooled": 1.0, "tokens_per_call_pooled": 1.0},
                "assd-self": {"metrics": {"nfe": nfe}, "tokens_per_round_pooled": 2.23, "tokens_per_call_pooled": 1.12,
                              "acceptance_by_index": [1.0, 0.18, 0.1, 0.05, 0.0]}}
    settings = {"model": "asarm-tiny", "num_sequences": 8, "length": 128, "visible": 7, "k": 5, "temperature": 1.0}
    path.write_text(json.dumps({"evaluation": "speculative", "metrics": {"settings": settings,
                                                                         "samplers": samplers}}))
    return path


def test_card_shows_the_given_evaluation_results(tmp_path, run_dir):
    nll, spec = _nll_results(tmp_path / "nll.json"), _speculative_results(tmp_path / "spec.json")
    dest = tmp_path / "exported"
    assert export_model.main([str(run_dir), str(dest), "--license", "mit", "--eval-results", str(nll),
                              "--eval-results", str(spec)]) == 0
    card = (dest / "README.md").read_text()
    assert _front_matter(card)["license"] == "mit"
    assert "| 4.815 (4.798 to 4.832) | nll.json |" in card
    assert "| unigram baseline NLL per token | 6.493 | nll.json |" in card
    assert "| assd-self | 107.9 (105.6 to 110.2) | 2.23 | 1.12 | 0.18 |" in card
    assert "| sequential | 121 | 1 | 1 | - |" in card
    assert "of WikiText-2 raw test, 95% masked, model asarm-tiny)" in card
    assert "8 sequences of 128 tokens, 7 visible, k = 5, T = 1" in card


def test_card_of_a_model_without_training_files(tmp_path, tiny_model_dir):
    card = hub.model_card(tiny_model_dir)
    assert "Training config: not recorded" in card
    assert "| held-out NLL per token (the training text's held-out split) | not measured | - |" in card
    assert "| layers | 1 |" in card and "| d_model | 16 |" in card
    assert f"| parameters | {sum(p.numel() for p in ASARM.from_pretrained(tiny_model_dir).parameters()):,} |" in card
    assert "on an XLNet backbone" in card and "| backbone | xlnet |" in card


def test_card_of_a_rope_model_names_its_backbone(tmp_path):
    ASARM.from_config(vocab_size=40, d_model=16, n_layer=1, n_head=2, d_inner=24, backbone="rope", seed=0,
                      device="cpu").save_pretrained(tmp_path / "rope")
    card = hub.model_card(tmp_path / "rope")
    assert "on the asarm rotary two-stream backbone" in card and "| backbone | asarm-rope |" in card
    # not a transformers model: the Hub must not offer transformers' loading snippet for it
    assert "library_name" not in _front_matter(card) and "asarm" in _front_matter(card)["tags"]


def test_hand_written_card_is_kept_and_gets_front_matter_on_the_hub(tmp_path, run_dir, local_hub):
    dest = tmp_path / "exported"
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    (dest / "README.md").write_text("# My model\n\nWritten by hand.\n")
    assert export_model.main([str(run_dir), str(dest), "--push-to-hub", REPO]) == 0
    assert (dest / "README.md").read_text() == "# My model\n\nWritten by hand.\n"
    snapshot = local_hub.folder(REPO) / "snapshots" / (local_hub.folder(REPO) / "refs" / "main").read_text()
    pushed = (snapshot / "README.md").read_text()
    assert _front_matter(pushed)["library_name"] == "transformers" and pushed.endswith("Written by hand.\n")
    # a generated card is regenerated on the next export
    (dest / "README.md").unlink()
    assert export_model.main([str(run_dir), str(dest)]) == 0
    assert export_model.main([str(run_dir), str(dest), "--license", "mit"]) == 0
    assert _front_matter((dest / "README.md").read_text())["license"] == "mit"


# ---------------------------------------------------------------------------------------- refusals

def test_the_embedded_model_is_replaced_only_with_force(tmp_path, run_dir, monkeypatch, capsys):
    from asarm.model import EMBEDDED_MODELS

    before = sorted((p.name, p.stat().st_mtime_ns) for p in EMBEDDED_MODELS["asarm-tiny"].iterdir())
    assert export_model.main([str(run_dir), str(EMBEDDED_MODELS["asarm-tiny"])]) == 2
    assert "--force" in _one_line_error(capsys)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in EMBEDDED_MODELS["asarm-tiny"].iterdir()) == before
    # --force replaces it (shown on a stand-in: the real one stays untouched by the tests)
    stand_in = tmp_path / "asarm-tiny"
    shutil.copytree(EMBEDDED_MODELS["asarm-tiny"], stand_in, ignore=shutil.ignore_patterns("*.safetensors"))
    hand_written = (stand_in / "README.md").read_text()
    monkeypatch.setattr(export_model, "EMBEDDED_MODELS", {"asarm-tiny": stand_in})
    assert export_model.main([str(run_dir), str(stand_in)]) == 2
    assert export_model.main([str(run_dir), str(stand_in), "--force"]) == 0
    assert (stand_in / "model.safetensors").exists()
    assert (stand_in / "README.md").read_text() == hand_written  # its hand-written card is kept


@pytest.mark.parametrize("repo", ["noslash", "a/b/c", "-a/b", "a/b.", "a/b--c", "/b", "a b/c"])
def test_a_repo_name_that_is_not_owner_name_is_one_line(repo, run_dir, tmp_path, capsys):
    assert export_model.main([str(run_dir), str(tmp_path / "out"), f"--push-to-hub={repo}"]) == 2
    assert "owner/name" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()  # checked before any export work


def test_bad_sources_and_destinations_are_one_line(tmp_path, run_dir, capsys):
    cases = [([str(tmp_path / "missing"), str(tmp_path / "out")], "does not exist"),
             ([str(tmp_path), str(tmp_path / "out")], "has no checkpoint")]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    cases.append(([str(run_dir), str(tmp_path / "notes")], "not a model directory"))
    for argv, message in cases:
        assert export_model.main(argv) == 2
        assert message in _one_line_error(capsys)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"


def test_pushing_offline_is_one_line(run_dir, tmp_path, local_hub, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert export_model.main([str(run_dir), "--push-to-hub", REPO]) == 2
    assert "HF_HUB_OFFLINE is set" in _one_line_error(capsys)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_offline", lambda: True)
    assert export_model.main([str(run_dir), "--push-to-hub", REPO]) == 2
    assert "not reachable" in _one_line_error(capsys)
    assert local_hub.calls == []


def test_a_failing_hub_client_is_one_line(run_dir, local_hub, monkeypatch, capsys):
    import huggingface_hub

    def refuse(self, *args, **kwargs):
        raise OSError("401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\n"
                      "Invalid credentials in Authorization header")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    assert export_model.main([str(run_dir), "--push-to-hub", REPO]) == 2
    assert "401 Client Error" in _one_line_error(capsys)


def test_bad_evaluation_results_are_one_line(tmp_path, run_dir, capsys):
    (tmp_path / "other.json").write_text(json.dumps({"evaluation": "rocstories", "metrics": {}}))
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "plain.json").write_text("[1, 2]")
    cases = [("missing.json", "cannot read"), ("junk.json", "cannot read"), ("plain.json", "not the results.json"),
             ("other.json", "nll and speculative results only")]
    for name, message in cases:
        assert export_model.main([str(run_dir), str(tmp_path / "out"), "--eval-results", str(tmp_path / name)]) == 2
        assert message in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_argument_combinations(run_dir):
    for argv in ([str(run_dir)], [str(run_dir), "out", "--revision", "v1"], [str(run_dir), "out", "--private"]):
        with pytest.raises(SystemExit) as exc:
            export_model.main(argv)
        assert exc.value.code == 2


def test_a_hub_load_knows_the_trained_length_like_a_local_load(tmp_path, run_dir, local_hub, monkeypatch):
    from huggingface_hub import constants

    dest = tmp_path / "exported"
    assert export_model.main([str(run_dir), str(dest), "--push-to-hub", REPO]) == 0
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert ASARM.from_pretrained(dest, device="cpu").trained_length == 16
    assert ASARM.from_pretrained(REPO, device="cpu").trained_length == 16
