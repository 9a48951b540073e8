"""Imported Hugging Face chat models, end to end: convert, chat, serve, compared with transformers.

A tiny random Llama model with a Llama 3 Instruct tokenizer directory (the official chat template,
``<|eot_id|>`` as eos) and a generation_config.json listing three eos ids and sampling defaults is
imported with ``utils/convert_hf.py``. Then:
- the engine honours every eos id (config.json's and generation_config.json's) and takes the
  sampling defaults for fields a request leaves unset;
- `LLM.chat`, ``inference/chat.py`` and a greedy ``/v1/chat/completions`` reply all equal
  `LLM.generate` on the same rendered prompt and ``transformers`` ``generate`` on the exported
  model; the prompt holds one BOS;
- a model without a chat template answers ``/v1/chat/completions`` with a 400, not a 500.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest
import torch

from chat_template_fixtures import make_tokenizer_dir
from inference.engine.llm import LLM
from inference.engine.sampling import SamplingParams
from serving_fixtures import serve_checkpoint
from utils.convert_hf import checkpoint_to_hf, hf_to_checkpoint

transformers = pytest.importorskip("transformers")

BOS, END_OF_TEXT, EOM, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"
HELLO = [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hello there! Tell me a story."}]
N = 12  # reply length (a random model rarely ends a turn by itself)


def _token_id(directory: Path, text: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json")).token_to_id(text)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random Llama 3 "instruct" model directory, as on the Hub."""
    path = make_tokenizer_dir("llama3", tmp_path_factory.mktemp("hf") / "llama3-instruct")
    vocab = json.loads((path / "tokenizer.json").read_text())
    size = len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])
    eos = [_token_id(path, t) for t in (END_OF_TEXT, EOM, EOT)]
    config = transformers.LlamaConfig(vocab_size=size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      initializer_range=0.2, bos_token_id=_token_id(path, BOS), eos_token_id=eos[0])
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "do_sample": True, "temperature": 0.6,
         "top_p": 0.9}))
    return path


@pytest.fixture(scope="module")
def ckpt(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "imported"
    hf_to_checkpoint(hf_dir, out)
    return out


@pytest.fixture(scope="module")
def llm(ckpt) -> LLM:
    return LLM(ckpt, device="cpu", dtype="float32", kv_cache_memory_mb=4)


def greedy(max_tokens: int = N, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


# ---------------------------------------------------------------------------- eos ids and defaults
def test_import_keeps_every_eos_id_and_the_sampling_defaults(hf_dir, ckpt, llm):
    assert (ckpt / "generation_config.json").is_file()
    eos = {_token_id(hf_dir, t) for t in (END_OF_TEXT, EOM, EOT)}
    assert set(llm.engine.eos_token_ids) == eos
    assert llm.engine.generation_defaults == {"temperature": 0.6, "top_p": 0.9}
    p = llm.engine.sampling_params(top_p=0.5)
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.5, 0)


def _first_new_token(tokens: list[int], exclude: set[int]) -> int:
    """Index of the first token that appears neither earlier in `tokens` nor in `exclude`."""
    return next(k for k in range(1, len(tokens)) if tokens[k] not in tokens[:k] and tokens[k] not in exclude)


@pytest.mark.parametrize("where", ["config.json", "generation_config.json"])
def test_every_eos_id_of_the_model_stops_generation(hf_dir, tmp_path, where):
    """Regression: only the first of several eos ids used to end a sequence."""
    eos = [_token_id(hf_dir, t) for t in (END_OF_TEXT, EOM)]
    free = LLM(hf_dir, device="cpu", dtype="float32", kv_cache_memory_mb=4)
    run = free.generate("Once upon a time", greedy(20, ignore_eos=True))[0].token_ids
    k = _first_new_token(run, set(eos))
    model = tmp_path / "model"
    shutil.copytree(hf_dir, model)
    file = model / where
    data = json.loads(file.read_text())
    data["eos_token_id"] = eos + [run[k]]  # the third eos id is what the model says at step k
    file.write_text(json.dumps(data))
    out = LLM(model, device="cpu", dtype="float32", kv_cache_memory_mb=4).generate("Once upon a time", greedy(20))[0]
    assert out.finish_reason == "stop" and out.token_ids == run[: k + 1]


def test_unset_request_fields_take_generation_config_defaults(hf_dir, tmp_path):
    """Regression: generation_config.json was never read. top_k=1 there makes any sampling greedy."""
    model = tmp_path / "model"
    shutil.copytree(hf_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"temperature": 1.3, "top_k": 1}))
    llm = LLM(model, device="cpu", dtype="float32", kv_cache_memory_mb=4)
    reference = llm.generate("Once upon a time", greedy(10, ignore_eos=True))[0].text
    assert llm.generate("Once upon a time")[0].text == llm.generate("Once upon a time", greedy(16))[0].text
    with serve_checkpoint(model) as (_, server):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        for seed in (1, 2):
            r = client.completions.create(model="tiny-test", prompt="Once upon a time", max_tokens=10, seed=seed,
                                          extra_body={"ignore_eos": True})
            assert r.choices[0].text == reference
        r = client.completions.create(model="tiny-test", prompt="Once upon a time", max_tokens=10, seed=1,
                                      extra_body={"ignore_eos": True, "top_k": 0})
        assert r.choices[0].text != reference  # a field the request sets wins over the default


# ---------------------------------------------------------------------------- chat, three ways + transformers
@pytest.fixture(scope="module")
def reference(hf_dir, ckpt, tmp_path_factory):
    """(prompt ids, reply text) of transformers on the model exported back from the checkpoint."""
    exported = tmp_path_factory.mktemp("export") / "hf"
    checkpoint_to_hf(ckpt, exported)
    tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    ids = tok.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    eos = json.loads((exported / "generation_config.json").read_text())["eos_token_id"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=N, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    new = out[0, len(ids):].tolist()
    return list(ids), tok.decode(new, skip_special_tokens=True)


def test_llm_chat_equals_generate_on_the_rendered_prompt_and_transformers(llm, reference, hf_dir):
    ids, text = reference
    out = llm.chat(HELLO, greedy())[0]
    assert out.prompt_token_ids == ids and ids.count(_token_id(hf_dir, BOS)) == 1  # one BOS
    assert out.prompt.startswith(BOS) and out.prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    again = llm.generate(out.prompt, greedy())[0]  # the rendered text: its BOS is not doubled
    assert again.prompt_token_ids == ids
    assert out.text == again.text == text and text


def test_server_chat_equals_llm_generate_and_transformers(ckpt, llm, reference):
    ids, text = reference
    rendered = llm.engine.chat_format.render(HELLO)
    with serve_checkpoint(ckpt) as (engine, server):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="tiny-test", messages=HELLO, temperature=0, max_tokens=N)
        c = client.completions.create(model="tiny-test", prompt=rendered, temperature=0, max_tokens=N)
    assert r.usage.prompt_tokens == len(ids) and c.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == llm.generate(rendered, greedy())[0].text == text
    assert c.choices[0].text == text


def test_chat_cli_on_the_imported_model(ckpt, reference, capsys):
    from inference import chat

    chat.main(["--checkpoint", str(ckpt), "--system", HELLO[0]["content"], "--prompt", HELLO[1]["content"],
               "--temperature", "0", "--max_new_tokens", str(N), "--device", "cpu", "--dtype", "float32"])
    assert capsys.readouterr().out == reference[1] + "\n"


def test_the_model_turn_ends_at_its_eos_ids(llm):
    """Chat stops where the template's turn ends: <|eot_id|> is an eos id, no ChatML token is needed."""
    assert llm.engine.chat_stop_token_ids == []
    assert llm.engine.tokenizer.token_to_id(EOT) in llm.engine.eos_token_ids


# ---------------------------------------------------------------------------- no chat template: 400
def test_chat_without_a_template_or_chatml_tokens_is_a_400(ckpt, tmp_path):
    """Regression: a tokenizer without ChatML tokens made /v1/chat/completions answer 500."""
    model = tmp_path / "no-template"
    shutil.copytree(ckpt, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with serve_checkpoint(model) as (_, server):
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
        assert r.status_code == 400, r.text
        assert "no chat template" in r.json()["error"]["message"] and r.json()["error"]["param"] == "messages"
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200
