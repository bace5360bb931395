"""Hugging Face exports (``export --format hf``), safetensors metadata, and the Python export API.

The model test uses the real ``transformers`` package: a tiny Llama built from a config (no
download) is trained one step under FSDP2 at 2 ranks, saved with shardckpt, exported, and
``AutoModelForCausalLM.from_pretrained`` must give the same logits as the original weights.
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import interop_targets as IT
import pytest
import torch
from harness import run_ranks
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import shardckpt
from shardckpt import exporter
from shardckpt.cli.main import main
from shardckpt.interop import ConversionError
from shardckpt.interop import hf as H

ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}


def transformers_accepts(path: Path) -> None:
    """The check ``transformers`` 4.x applies to every safetensors file it loads."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    if metadata is None or metadata.get("format") not in ("pt", "tf", "flax", "mlx"):
        raise OSError(f"{path} does not contain the valid metadata; re-save it with "
                      "save_pretrained")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("llama")
    root, ref, cfg = str(d / "ckpt"), str(d / "ref.safetensors"), d / "cfg"
    results = run_ranks(IT.llama_fsdp_save, 2, root, ref, str(cfg), timeout=240, env=ENV)
    assert all(r["sharded"] > 0 for r in results)  # FSDP2 really sharded the parameters
    return {"root": root, "ref": ref, "cfg": cfg}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(24).reshape(2, 12) * 5 % 128
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reference_logits(llama: dict) -> torch.Tensor:
    model = IT.tiny_llama(seed=99)
    model.load_state_dict(load_file(llama["ref"]))
    return _logits(model)


def test_hf_export_loads_in_transformers_with_identical_logits(llama: dict, tmp_path: Path,
                                                               capsys) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    # no --step: the latest step; --config given as the folder holding config.json
    assert main(["export", llama["root"], "--format", "hf", "--only", "model", "--out",
                 str(out), "--config", str(llama["cfg"]), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["step"] == 1 and doc["format"] == "hf"
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                       "model.safetensors"]
    transformers_accepts(out / "model.safetensors")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "shardckpt_step": "1",  # + what it wrote too
                                "shardckpt_files": '["config.json", "generation_config.json"]'}
    ref = load_file(llama["ref"])
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(ref)  # the module's own names: the "model/" prefix is gone
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(_logits(model), _reference_logits(llama))


def test_hf_sharded_export_with_index_then_reexport(llama: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    assert main(["export", llama["root"], "--step", "1", "--format", "hf", "--only", "model",
                 "--out", str(out), "--max-shard-size", "20KB", "--config",
                 str(llama["cfg"] / "config.json")]) == 0
    index = json.loads((out / H.INDEX).read_text())
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    ref = load_file(llama["ref"])
    assert set(index["weight_map"]) == set(ref)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size()
                                                  for v in ref.values())
    for name in shards:
        transformers_accepts(out / name)
        part = load_file(str(out / name))
        assert all(index["weight_map"][k] == name and torch.equal(v, ref[k])
                   for k, v in part.items())
        # 20 KB each, except a single tensor larger than that on its own
        assert os.path.getsize(out / name) < 20_000 + 4096 or len(part) == 1
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(_logits(model), _reference_logits(llama))

    # exporting again into the same folder replaces the previous export, shards and index too
    assert main(["export", llama["root"], "--format", "hf", "--only", "model", "--out",
                 str(out)]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(_logits(model), _reference_logits(llama))


def test_hf_dtype_casts_floating_tensors_only(llama: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    root = tmp_path / "mixed"
    with shardckpt.CheckpointManager(str(root), async_save=False, capture_rng=False) as mgr:
        mgr.save(3, {"model": {"w": torch.randn(4, 4, dtype=torch.float64),
                               "ids": torch.arange(5), "mask": torch.ones(3, dtype=torch.bool)}})
    out = tmp_path / "cast"
    result = shardckpt.export(str(root), format="hf", out=str(out), only="model", dtype="fp16")
    got = load_file(str(out / "model.safetensors"))
    assert {k: v.dtype for k, v in got.items()} == {"w": torch.float16, "ids": torch.int64,
                                                    "mask": torch.bool}
    assert result.nbytes == 16 * 2 + 5 * 8 + 3
    # and a bf16 export of the Llama loads in bf16 with the logits of the bf16 reference
    out = tmp_path / "bf16"
    assert main(["export", llama["root"], "--format", "hf", "--only", "model", "--out",
                 str(out), "--dtype", "bf16", "--config", str(llama["cfg"])]) == 0
    got = load_file(str(out / "model.safetensors"))
    ref = load_file(llama["ref"])
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, ref[k].to(torch.bfloat16))
               for k, v in got.items())
    # it loads exactly as transformers' own bf16 save of the reference weights does
    ref_model = IT.tiny_llama(seed=99)
    ref_model.load_state_dict(ref)
    ref_model.to(torch.bfloat16).save_pretrained(str(tmp_path / "ref_bf16"))
    expected = _logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "ref_bf16"),
                                                            dtype=torch.bfloat16))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    assert torch.equal(_logits(model), expected)


@pytest.fixture
def many(tmp_path: Path) -> str:
    """A checkpoint of 30 tensors of 4 to 64 KiB (about 1 MiB in all)."""
    root = str(tmp_path / "many")
    gen = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(1024 * (1 + i % 16), generator=gen)
             for i in range(30)}
    with shardckpt.CheckpointManager(root, async_save=False, capture_rng=False) as mgr:
        mgr.save(5, {"model": state})
    return root


def test_hf_export_streams_one_tensor_at_a_time(many: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Count the bytes read from the checkpoint that are still alive (each tensor the reader
    hands out is tracked until it is freed): the export never holds more than the largest
    tensor plus one output shard, and in fact holds one tensor."""
    live = {"now": 0, "peak": 0, "reads": 0}
    read = exporter.StepSource.read

    def tracked(self: exporter.StepSource, meta):  # type: ignore[no-untyped-def]
        tensor = read(self, meta)
        n = tensor.numel() * tensor.element_size()
        live["now"] += n
        live["reads"] += 1
        live["peak"] = max(live["peak"], live["now"])
        weakref.finalize(tensor, lambda: live.__setitem__("now", live["now"] - n))
        return tensor

    monkeypatch.setattr(exporter.StepSource, "read", tracked)
    shard = 200_000
    result = shardckpt.export(many, format="hf", out=str(tmp_path / "hf"), only="model",
                              max_shard_size=shard)
    peak = live["peak"]
    sizes = [v.numel() * v.element_size()
             for v in shardckpt.consolidated_state_dict(many, only="model").values()]
    assert live["reads"] == 2 * 30  # 30 for the export, 30 for the reference just above
    assert len([f for f in result.files if f.endswith(".safetensors")]) > 4
    assert result.nbytes == sum(sizes)
    assert peak <= max(sizes) + shard  # the promise
    assert peak <= max(sizes) < sum(sizes) / 10  # and what this writer does


def test_safetensors_export_has_pt_format_metadata(many: str, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    assert main(["export", many, "--format", "safetensors", "--out", str(out), "--only",
                 "model"]) == 0
    transformers_accepts(out)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "shardckpt_step": "5"}
    assert len(load_file(str(out))) == 30
    # what the check catches: a file without the key, as this export wrote before
    save_file({"w": torch.ones(2)}, str(tmp_path / "old.safetensors"),
              metadata={"shardckpt_step": "5"})
    with pytest.raises(OSError, match="valid metadata"):
        transformers_accepts(tmp_path / "old.safetensors")


def test_hf_refuses_a_folder_that_is_not_a_previous_export(many: str, tmp_path: Path,
                                                           capsys) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", many, "--format", "hf", "--only", "model", "--out", str(out)]) == 64
    assert "notes.txt, which no shardckpt export wrote" in capsys.readouterr().err
    assert os.listdir(out) == ["notes.txt"]
    # a model file that shardckpt did not write is not replaced either
    save_file({"w": torch.ones(2)}, str(out / "model.safetensors"), metadata={"format": "pt"})
    assert main(["export", many, "--format", "hf", "--only", "model", "--out", str(out)]) == 64
    assert "model.safetensors, which no shardckpt export wrote" in capsys.readouterr().err
    assert list(load_file(str(out / "model.safetensors"))) == ["w"]
    # a previous export is replaced; with a file a user added to it (a tokenizer), only when
    # told to (issue 25: never overwrite or mix with files no export wrote), and that file stays
    prev = tmp_path / "prev"
    assert main(["export", many, "--format", "hf", "--only", "model", "--out", str(prev)]) == 0
    (prev / "tokenizer.json").write_text("{}")
    assert main(["export", many, "--format", "hf", "--only", "model", "--out", str(prev),
                 "--max-shard-size", "300KB"]) == 64
    assert "tokenizer.json, which no shardckpt export wrote" in capsys.readouterr().err
    assert main(["export", many, "--format", "hf", "--only", "model", "--out", str(prev),
                 "--max-shard-size", "300KB", "--force"]) == 0
    assert sorted(os.listdir(prev))[-2:] == ["model.safetensors.index.json", "tokenizer.json"]
    assert "model.safetensors" not in os.listdir(prev)


def test_exported_files_follow_the_umask(many: str, tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "llama"}')
    os.chmod(cfg, 0o600)
    old = os.umask(0o027)
    try:
        shardckpt.export(many, format="hf", out=str(tmp_path / "hf"), only="model",
                         max_shard_size="300KB", config=str(cfg))
        shardckpt.export(many, format="safetensors", out=str(tmp_path / "one.safetensors"))
    finally:
        os.umask(old)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o750
    files = [tmp_path / "hf" / n for n in os.listdir(tmp_path / "hf")]
    assert len(files) > 3 and {f.stat().st_mode & 0o777 for f in files} == {0o640}
    assert (tmp_path / "one.safetensors").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize(("argv", "message"), [
    (["--format", "torch", "--dtype", "bf16"], "--dtype: only with --format hf"),
    (["--format", "hf", "--max-shard-size", "lots"], "max shard size 'lots'"),
    (["--format", "hf", "--max-shard-size", "0"], "must be positive"),
    (["--format", "hf", "--config", "{tmp}/nothing"], "no such file or folder"),
    (["--format", "hf", "--config", "{tmp}"], "holds no config.json"),
    (["--format", "hf", "--only", "optim"], "has no tensors under 'optim'"),
    (["--format", "hf", "--out", "{tmp}/no/such/dir"], "does not exist"),
])
def test_hf_usage_errors(many: str, tmp_path: Path, capsys, argv: list[str],
                         message: str) -> None:
    (tmp_path / "generation_config.json").write_text("{}")  # but no config.json
    args = [a.format(tmp=tmp_path) for a in argv]
    out = [] if "--out" in args else ["--out", str(tmp_path / "o")]
    assert main(["export", many, *args, *out]) == 64
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_python_api(many: str, tmp_path: Path) -> None:
    sd = shardckpt.consolidated_state_dict(many, only="model")
    assert set(sd) == {f"layer{i}.weight" for i in range(30)}
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in sd.values())
    full = shardckpt.consolidated_state_dict(many, step=5)
    assert set(full) == {f"model/{k}" for k in sd}  # no RNG or other shardckpt keys
    result = shardckpt.export(many, step=5, format="torch", out=str(tmp_path / "m.pt"),
                              only="model")
    assert result == shardckpt.ExportResult(5, "torch", str(tmp_path / "m.pt"), 30,
                                            sum(v.nbytes for v in sd.values()),
                                            (str(tmp_path / "m.pt"),))
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    for kwargs, match in (({"format": "npz"}, "unknown export format"),
                          ({"format": "torch", "dtype": "bf16"}, "takes no option dtype"),
                          ({"format": "hf", "dtype": "int8"}, "dtype 'int8'"),
                          ({"format": "hf"}, "needs out=PATH")):
        out = None if kwargs == {"format": "hf"} else str(tmp_path / "x")
        with pytest.raises(ConversionError, match=match):
            shardckpt.export(many, out=out, **kwargs)


def test_tied_weights_are_exported_under_both_names(tmp_path: Path) -> None:
    root = str(tmp_path / "tied")
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    with shardckpt.CheckpointManager(root, async_save=False, capture_rng=False) as mgr:
        mgr.save(1, {"model": model})
    sd = shardckpt.consolidated_state_dict(root, only="model")
    assert sd["emb.weight"] is sd["head.weight"]
    shardckpt.export(root, format="hf", out=str(tmp_path / "hf"), only="model")
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(got["emb.weight"], emb.weight) and torch.equal(got["head.weight"],
                                                                        emb.weight)


def test_export_latest_is_the_newest_manifest_even_if_corrupt(many: str, tmp_path: Path,
                                                              capsys) -> None:
    from shardckpt.storage import step_dirname

    os.makedirs(Path(many) / step_dirname(9))  # a newer save that never committed: skipped
    out = tmp_path / "latest.safetensors"
    assert main(["export", many, "--format", "safetensors", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 5
    with shardckpt.CheckpointManager(many, async_save=False, capture_rng=False) as mgr:
        mgr.save(7, {"model": {"w": torch.ones(3)}})
    manifest = Path(many) / step_dirname(7) / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:50])  # truncated: the newest step is corrupt
    assert main(["export", many, "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert str(manifest) in err or f"{step_dirname(7)}/manifest.json" in err, err
    assert not (tmp_path / "hf").exists()
